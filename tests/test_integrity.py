"""What a third party can check in a run directory: the ledger, its signatures, and the files it names."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fedtune import config
from fedtune.ledger import Ledger, audit, entry_hash
from fedtune.secure import identity
from fedtune.secure.identity import Identity
from fedtune.server_app import run_federation
from tests.conftest import tiny_overrides
from tests.nodes import InProcessGrid, make_nodes


@pytest.fixture(scope="module")
def finished_run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-round masked run over three in-process nodes."""
    root = tmp_path_factory.mktemp("integrity")
    overrides = tiny_overrides(
        tiny_bert_dir,
        root,
        "federation.num_clients=3",
        "secure=masking",
        f"federation.server_identity_key={root / 'server.pem'}",
    )
    nodes = make_nodes(root, overrides, 3)
    run_federation(InProcessGrid(nodes), config.load_experiment(nodes[0].context.run_config))
    return root / "run"


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    return copy


def _rewrite(run: Path, index: int, change: Callable[[dict], None], signer: Identity | None) -> None:
    """Change ledger entry ``index`` and recompute its hash (and, with ``signer``, sign it again)."""
    entries = Ledger(run).entries()
    change(entries[index])
    entries[index]["hash"] = entry_hash(entries[index])
    if signer is not None:
        entries[index]["signature"] = signer.sign(bytes.fromhex(entries[index]["hash"])).hex()
    (run / "ledger.jsonl").write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def test_every_entry_is_signed_by_the_server_and_every_contribution_by_its_client(
    finished_run: Path, tmp_path: Path
) -> None:
    server = identity.load_or_create(finished_run.parent / "server.pem")
    assert audit(finished_run, server_key=server.public_hex) == []
    assert "not by the trusted key" in audit(finished_run, server_key=Identity.generate().public_hex)[0]
    rounds = [e for e in Ledger(finished_run).entries() if e["kind"] == "round"]
    assert all(
        sorted(e["received"]) == sorted(e["participants"]) == ["hospital-0", "hospital-1", "hospital-2"] for e in rounds
    )

    def inflate(entry: dict) -> None:
        entry["privacy"] = {"client_dp_epsilon": 0.1}

    edited = _copy(finished_run, tmp_path / "edited")
    _rewrite(edited, 1, inflate, signer=None)  # whoever edits without the server's key
    assert "its signature does not verify under the server key" in audit(edited)[0]

    def add_a_participant(entry: dict) -> None:
        entry["participants"].append("hospital-9")
        entry["received"]["hospital-9"] = {"digest": "00" * 32, "signature": "00" * 64, "key": server.public_hex}

    forged = _copy(finished_run, tmp_path / "forged")
    _rewrite(forged, 1, add_a_participant, signer=server)  # even the server cannot sign for a client
    assert (
        audit(forged)[0]
        == "entry 1 (round round 1): the reply of ['hospital-9'] does not carry that client's valid signature"
    )


def test_audit_fails_on_a_missing_checkpoint_instead_of_skipping_it(finished_run: Path, tmp_path: Path) -> None:
    copy = _copy(finished_run, tmp_path)
    assert audit(copy) == []
    (copy / "checkpoints" / "round-0001.pt").unlink()
    problems = audit(copy)
    assert problems and "checkpoints/round-0001.pt is missing" in problems[0] and "fedtune decrypt" in problems[0]
