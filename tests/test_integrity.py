"""What a third party can check in a run directory: the ledger, its signatures, and the files it names."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune import config
from fedtune.ledger import audit
from fedtune.server_app import run_federation
from tests.conftest import tiny_overrides
from tests.nodes import InProcessGrid, make_nodes


@pytest.fixture(scope="module")
def finished_run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-round masked run over three in-process nodes."""
    root = tmp_path_factory.mktemp("integrity")
    overrides = tiny_overrides(tiny_bert_dir, root, "federation.num_clients=3", "secure=masking")
    nodes = make_nodes(root, overrides, 3)
    run_federation(InProcessGrid(nodes), config.load_experiment(nodes[0].context.run_config))
    return root / "run"


def test_audit_fails_on_a_missing_checkpoint_instead_of_skipping_it(finished_run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    assert audit(copy) == []
    (copy / "checkpoints" / "round-0001.pt").unlink()
    problems = audit(copy)
    assert problems and "checkpoints/round-0001.pt is missing" in problems[0] and "fedtune decrypt" in problems[0]
