"""secure=masking in whole federations: same result as plaintext, dropouts, untrusted nodes, audit.

The protocol itself is tested in test_masking.py; here it runs between the real server loop and real
ClientApps, with nodes that fail mid-protocol or are not trusted: in-process (tests/nodes.py) where the
property does not depend on Ray, and as real Flower simulations (Ray actors as SuperNodes) for the masked
run that the plaintext one is compared with and for the dropouts under organisation-level DP.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from fedtune import adapters, cli, client_state, config, wire
from fedtune.client_app import client_key, make_client_app
from fedtune.ledger import Ledger, audit
from fedtune.run_dir import RunDir
from fedtune.secure import identity
from fedtune.secure.fixed_point import FixedPoint
from fedtune.secure.session import Session
from fedtune.secure_client import SECAGG_STATE
from fedtune.server_app import make_server_app, run_federation
from tests.conftest import tiny_overrides
from tests.nodes import InProcessGrid, federate, make_nodes


def _checkpoint(run_dir: Path, server_round: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / f"round-{server_round:04d}.pt", weights_only=True)["adapter"]


def _train_metric(run_dir: Path, name: str) -> dict[int, float]:
    return {
        m["round"]: m["value"] for m in RunDir(run_dir).read_metrics() if m["scope"] == "train" and m["metric"] == name
    }


@pytest.fixture(scope="module")
def runs(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The same 3-client experiment in the clear (in-process) and masked (a real Flower simulation, Ray actors as
    SuperNodes); the masked run records what the server handled."""
    root = tmp_path_factory.mktemp("secure")
    seen: dict[str, list] = {"replies": [], "decoded": []}
    verify, decode = wire.verify, FixedPoint.decode

    def spy_verify(content, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202 - transparent wrapper
        dtypes = [a.dtype for r in content.array_records.values() for a in r.values()]
        seen["replies"].append((args[1].server_round, args[2], dtypes))
        return verify(content, *args, **kwargs)

    def spy_decode(self, total, template):  # noqa: ANN001, ANN202
        seen["decoded"].append(total.shape)
        return decode(self, total, template)

    overrides = tiny_overrides(tiny_bert_dir, root / "plain" / "run", "federation.num_clients=3")
    plain = federate(root / "plain", overrides, 3, prefix="partition")
    overrides = [*overrides, f"run_dir={root / 'masked'}", "secure=masking"]
    with pytest.MonkeyPatch.context() as patch:  # the ServerApp runs in this process, clients in Ray actors
        patch.setattr(wire, "verify", spy_verify)
        patch.setattr(FixedPoint, "decode", spy_decode)
        assert cli.main(["run", *overrides]) == 0
    return {"plain": plain, "masked": root / "masked", "overrides": overrides, "seen": seen}


def test_masked_aggregate_equals_the_plaintext_one_within_the_logged_bound(runs: dict) -> None:
    plain, masked = _checkpoint(runs["plain"], 1), _checkpoint(runs["masked"], 1)
    bound = _train_metric(runs["masked"], "aggregation_error_bound")[1]
    for key in plain:
        float32_rounding = 2 * torch.finfo(torch.float32).eps * plain[key].abs().max()
        assert (plain[key] - masked[key]).abs().max() <= bound + float32_rounding
    assert 0 < bound < 1e-5
    assert _train_metric(runs["masked"], "clients") == {1: 3.0, 2: 3.0}


def test_server_handles_only_masked_uploads_and_decodes_only_their_sum(runs: dict) -> None:
    replies = runs["seen"]["replies"]
    train = [dtypes for _, step, dtypes in replies if step == "train"]
    assert len(train) == 6 and all(dtypes == ["uint32"] for dtypes in train)  # 3 clients x 2 rounds, no float arrays
    assert all(not dtypes for _, step, dtypes in replies if step != "train")
    assert len(runs["seen"]["decoded"]) == 2  # one decode per round: of the sum of the uploads
    plain_bytes = _train_metric(runs["plain"], "upload_bytes_per_client")[1]
    masked_bytes = _train_metric(runs["masked"], "upload_bytes_per_client")[1]
    assert masked_bytes < 1.3 * plain_bytes  # the tiny adapter makes the fixed key/share cost visible here


def test_a_steady_round_takes_three_exchanges_with_keys_and_shares_pipelined(runs: dict) -> None:
    replies = runs["seen"]["replies"]
    steps = {r: Counter(step for rr, step, _ in replies if rr == r and step != "evaluate") for r in (1, 2)}
    first = {wire.SECAGG_KEYS: 3, wire.SECAGG_SHARES: 3, "train": 3, wire.SECAGG_AGREE: 3, wire.SECAGG_UNMASK: 3}
    assert steps[1] == first
    assert steps[2] == {"train": 3, wire.SECAGG_AGREE: 3, wire.SECAGG_UNMASK: 3}  # round 1's replies set round 2 up
    assert _train_metric(runs["masked"], "exchanges") == {1: 5.0, 2: 3.0}


def test_with_client_sampling_only_rounds_of_already_prepared_clients_are_pipelined(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """4 nodes, 3 sampled a round: a round is pipelined exactly when all its clients were in the round before."""
    run = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_bert_dir,
        run,
        "federation.num_clients=4",
        "federation.num_rounds=4",
        "federation.fraction_train=0.75",
        "federation.fraction_evaluate=0",
        "secure=masking",
        "seed=6",  # samples {0,1,2}, {1,2,3}, {1,2,3}, {0,2,3}: a new client in rounds 2 and 4, none in round 3
    )
    federate(tmp_path, overrides, 4, prefix="partition")
    rounds = [e for e in Ledger(run).entries() if e["kind"] == "round"]
    participants = {e["round"]: set(e["participants"]) for e in rounds}
    assert all(len(names) == 3 for names in participants.values())
    expected = {1: 5.0, **{r: 3.0 if participants[r] <= participants[r - 1] else 5.0 for r in (2, 3, 4)}}
    assert _train_metric(run, "exchanges") == expected
    assert set(list(expected.values())[1:]) == {3.0, 5.0}  # this seed's draws exercise both kinds of round
    assert audit(run) == []


def test_masked_nodes_do_not_announce_their_data_sizes(runs: dict) -> None:
    assert not (runs["masked"] / "partitions.json").exists()
    assert (runs["plain"] / "partitions.json").is_file()


def test_audit_accepts_an_intact_run_and_names_what_was_changed(runs: dict, tmp_path: Path) -> None:
    assert audit(runs["masked"]) == []
    head = Ledger(runs["masked"]).entries()[-1]["hash"]
    assert audit(runs["masked"], head=head) == []

    def tampered(change: Callable[[Path], None]) -> list[str]:
        copy = tmp_path / f"copy-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(runs["masked"], copy)
        change(copy)
        return audit(copy, head=head)

    def edit_metric(run: Path) -> None:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        index = next(i for i, line in enumerate(lines) if '"round": 2' in line and "macro_f1" in line)
        line = json.loads(lines[index])
        lines[index] = json.dumps({**line, "value": line["value"] + 0.1})
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")

    def edit_adapter(run: Path) -> None:
        path = run / "adapter" / "adapter_model.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(data)

    def remove_round(run: Path) -> None:
        lines = (run / "ledger.jsonl").read_text().splitlines()
        (run / "ledger.jsonl").write_text("\n".join(lines[:1] + lines[2:]) + "\n")

    def cut_tail(run: Path) -> None:
        lines = (run / "ledger.jsonl").read_text().splitlines()
        (run / "ledger.jsonl").write_text("\n".join(lines[:-1]) + "\n")

    assert tampered(edit_metric) == [
        "entry 2 (round round 2): the metric lines of round 2 in metrics.jsonl were changed"
    ]
    assert tampered(edit_adapter) == [
        "entry 3 (export round 2): adapter/adapter_model.safetensors is missing or was changed"
    ]
    assert "entry 1 (round round 2): does not follow the entry before it" in tampered(remove_round)[0]
    assert "entries were cut off" in tampered(cut_tail)[0]
    assert cli.main(["audit", str(runs["masked"])]) == 0


def _flaky_app(run_config: dict, failures: dict[tuple[str, int], str], observe: Path | None = None) -> ClientApp:
    """The real ClientApp, except that a node listed in ``failures`` under ``(name, round)`` raises at that step,
    or, for ``"garbage:<step>"``, answers that step with a validly signed but meaningless reply, or, for
    ``"forged-next-keys"``, gets an unmask request whose next-round keys fail their signature check. With ``observe``,
    each handled message appends [node, round, step, rounds whose secrets the node's Context.state holds]."""
    real, flaky = make_client_app(run_config), ClientApp()

    def relay(step: str) -> Callable[[Message, Context], Message]:
        def handle(msg: Message, context: Context) -> Message:
            server_round = int(msg.content.config_records[wire.CONFIG][wire.SERVER_ROUND])
            node = client_key(context.node_config)
            failure = failures.get((node, server_round))
            if failure == step:
                raise RuntimeError(f"node lost during {step}")
            if (
                failure == "forged-next-keys"
                and step == "secagg_unmask"
                and wire.BUNDLES in msg.content.config_records[wire.CONFIG]
            ):
                received = msg.content.config_records[wire.CONFIG]
                bundles = json.loads(str(received[wire.BUNDLES]))
                first = json.loads(bundles[0])
                first["signature"] = "00" * 64
                received[wire.BUNDLES] = json.dumps([json.dumps(first), *bundles[1:]])
            if failure == f"garbage:{step}":
                received = msg.content.config_records[wire.CONFIG]
                session = Session(str(received[wire.RUN_NONCE]), server_round)
                signer = identity.load_or_create(client_state.identity_file(context.node_config, node))
                junk = RecordDict({wire.CONFIG: ConfigRecord({"junk": "not a protocol message"})})
                return Message(wire.sign(junk, signer, session, msg.metadata.message_type, node), reply_to=msg)
            answer = real(msg, context)
            if observe is not None:
                held = sorted(int(k.rsplit("/", 1)[1]) for k in context.state.config_records.get(SECAGG_STATE, {}))
                with observe.open("a") as log:
                    log.write(json.dumps([node, server_round, step, held]) + "\n")
            return answer

        return handle

    flaky.query()(relay("query"))
    flaky.evaluate()(relay("evaluate"))
    flaky.train()(relay("train"))
    for action in ("secagg_keys", "secagg_ring", "secagg_shares", "secagg_agree", "secagg_unmask"):
        flaky.train(action)(relay(action))
    return flaky


def test_dropouts_mid_protocol_with_organisation_dp(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """4 nodes, t = 3: one loss after uploading (round 1) or before (round 2) is recovered; two losses in
    round 3 leave 2 < t, so that round is abandoned (its uploads are spent, it is never retried) with the
    adapter unchanged, and the run ends normally. In round 1 another node refuses the next round's keys it is
    sent (bad signature): it still reveals for round 1."""
    run = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_bert_dir,
        run,
        "federation.num_clients=4",
        "federation.num_rounds=3",
        "secure=masking",
        "privacy=client_dp",
        "privacy.noise_at=clients",
    )
    failures = {
        ("partition-3", 1): "secagg_unmask",
        ("partition-1", 1): "forged-next-keys",  # without its reveal round 1 would have 2 < t: it must still come
        ("partition-3", 2): "train",
        ("partition-2", 3): "secagg_unmask",
        ("partition-3", 3): "secagg_unmask",
    }
    run_config = config.to_run_config(overrides, str(run))
    run_simulation(
        server_app=make_server_app(run_config),
        client_app=_flaky_app(run_config, failures),
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    assert _train_metric(run, "clients") == {1: 4.0, 2: 3.0}  # round 1 keeps the upload of the node lost later
    assert _train_metric(run, "exchanges") == {1: 5.0, 2: 5.0}  # that node dealt no round-2 shares: all 5 steps
    assert _train_metric(run, "abandoned") == {3: 1.0}
    abandoned = [e for e in Ledger(run).entries() if e["kind"] == "round" and "abandoned" in e]
    assert [e["round"] for e in abandoned] == [3] and "2 clients revealed their shares, 3 are needed" in abandoned[0][
        "abandoned"
    ]
    assert adapters.fingerprint(_checkpoint(run, 3)) == adapters.fingerprint(_checkpoint(run, 2))
    epsilons = [m for m in RunDir(run).read_metrics() if m["metric"] == "client_dp_epsilon"]
    assert [m["round"] for m in epsilons] == [1, 2]  # no sum of round 3 was revealed: nothing to account
    assert Ledger(run).last_round() == 3 and audit(run) == []
    assert all(torch.isfinite(t).all() for t in _checkpoint(run, 2).values())


def test_a_simulation_rerun_in_a_recreated_run_dir_starts_afresh(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulated nodes without a ``state-dir`` keep their records (uploads, privacy state) in the run dir, not
    in the user's cache: a run dir deleted and run again gets every client's round-1 upload (with the records
    in the cache, every node refused round 1 as already uploaded, and a second test session on one machine
    failed that way)."""
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_bert_dir, run, "federation.num_clients=3", "federation.num_rounds=1", "secure=masking"
    )
    for attempt in (1, 2):
        nodes = make_nodes(tmp_path, overrides, 3, prefix="partition")
        for node in nodes:
            del node.context.node_config["state-dir"]
        experiment = config.load_experiment(config.to_run_config(overrides, str(run)))
        run_federation(InProcessGrid(nodes), experiment, simulated=True)
        assert _train_metric(run, "clients") == {1: 3.0}, f"attempt {attempt}"
        assert len(list((run / "node-state" / "uploads").iterdir())) == 3
        assert not (tmp_path / "cache" / "client-state" / "uploads").exists()
        shutil.rmtree(run)


def test_a_node_missing_from_the_trusted_keys_is_not_admitted(tiny_bert_dir: Path, tmp_path: Path) -> None:
    trusted = tmp_path / "server_trusted.json"
    for partition in (0, 1):  # the keys the nodes use (tests/nodes.py creates them under keys/)
        name = f"partition-{partition}"
        identity.add_trusted_key(trusted, name, identity.load_or_create(tmp_path / "keys" / f"{name}.pem").public_hex)
    run = tmp_path / "run"
    overrides = tiny_overrides(
        tiny_bert_dir, run, "federation.num_clients=3", "federation.num_rounds=1", f"federation.trusted_keys={trusted}"
    )
    federate(tmp_path, overrides, 3, prefix="partition")
    assert _train_metric(run, "clients") == {1: 2.0}
    assert not [m for m in RunDir(run).read_metrics() if m["scope"] == "client:partition-2"]
    assert not (run / "node_keys.json").exists()  # a trusted list is used as is, nothing is pinned
    assert np.isfinite(_train_metric(run, "train_loss")[1])


def test_ring_neighbourhoods_recover_a_dropout_in_a_real_run(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """SecAgg+ (secure.neighbours=2) over 5 nodes and 3 rounds. Round 1 runs all six steps; round 2 has its keys
    from round 1's uploads (five exchanges: ring, shares, train, agree, unmask) and a node lost after dealing its
    shares has its masks removed; round 3 runs all six steps (that node prepared nothing) and a malformed (but signed)
    reply is rejected. Round secrets never outlive their round."""
    run, observed = tmp_path / "run", tmp_path / "secrets.jsonl"
    overrides = tiny_overrides(
        tiny_bert_dir,
        run,
        "federation.num_clients=5",
        "federation.num_rounds=3",
        "secure=masking",
        "secure.neighbours=2",
    )
    failures = {("partition-4", 2): "train", ("partition-1", 3): "garbage:secagg_shares"}
    # A neighbourhood of 3 that loses one cannot also outvote a colluder (node config colluders, default 1).
    federate(
        tmp_path,
        overrides,
        5,
        lambda run_config: _flaky_app(run_config, failures, observed),
        prefix="partition",
        node_config={"colluders": 0},
    )
    assert _train_metric(run, "clients") == {1: 5.0, 2: 4.0, 3: 4.0}
    assert _train_metric(run, "exchanges") == {1: 6.0, 2: 5.0, 3: 6.0}
    assert audit(run) == []
    for earlier, later in ((1, 2), (2, 3)):
        before, after = _checkpoint(run, earlier), _checkpoint(run, later)
        step = max((after[k] - before[k]).abs().max().item() for k in before)
        assert 0 < step < 0.1  # a mask left in the sum would move the adapter by ~2^31 / scale, far beyond this
    held = [json.loads(line) for line in observed.read_text().splitlines()]
    assert all(len(rounds) <= 2 for *_, rounds in held)  # this round's secrets and at most the next one's
    unmasked = [(r, rounds) for _, r, step, rounds in held if step == "secagg_unmask"]
    assert len(unmasked) == 5 + 4 + 4 and all(min(rounds, default=r + 1) > r for r, rounds in unmasked)
    assert all(rounds == [] for _, r, step, rounds in held if step == "secagg_unmask" and r == 3)  # nothing left
    # a new round's key step erases what is left of earlier ones (partition-4's round 2, lost before uploading)
    assert all(rounds == [r] for _, r, step, rounds in held if step == "secagg_keys")


@pytest.mark.parametrize("lost_at", ["secagg_unmask", "secagg_ring"])
def test_a_ring_round_after_a_loss(tiny_bert_dir: Path, tmp_path: Path, lost_at: str) -> None:
    """SecAgg+ over 5 nodes, one lost in round 1. Lost while unmasking, it revealed no ring secret for round 2,
    which starts from its first step with all five. Lost at the ring step, it leaves U1 without its secret: U1
    cannot shrink once the others' secrets are out (the server would choose the ring), so round 1 is abandoned
    before anyone trains, and the run goes on with round 2."""
    run, observed = tmp_path / "run", tmp_path / "steps.jsonl"
    overrides = tiny_overrides(
        tiny_bert_dir,
        run,
        "federation.num_clients=5",
        "federation.num_rounds=2",
        "secure=masking",
        "secure.neighbours=2",
    )
    failures = {("partition-3", 1): lost_at}
    federate(tmp_path, overrides, 5, lambda run_config: _flaky_app(run_config, failures, observed), prefix="partition")
    assert _train_metric(run, "exchanges")[2] == 6.0  # keys, ring, shares, train, agree, unmask
    assert audit(run) == []
    if lost_at == "secagg_ring":
        steps = [json.loads(line) for line in observed.read_text().splitlines()]
        assert not [s for s in steps if s[1] == 1 and s[2] == "train"]  # nobody trained (or uploaded) in round 1
        assert _train_metric(run, "abandoned") == {1: 1.0}
        assert _train_metric(run, "clients") == {2: 5.0}
        entries = {e["round"]: e for e in Ledger(run).entries() if e["kind"] == "round"}
        assert "did not reveal their ring secrets" in entries[1]["abandoned"]
    else:
        assert _train_metric(run, "clients") == {1: 5.0, 2: 5.0}


def test_a_malformed_reply_at_connect_leaves_that_node_out(tiny_bert_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = tiny_overrides(tiny_bert_dir, run, "federation.num_clients=3", "federation.num_rounds=1")
    garbage = {("partition-2", 0): "garbage:query"}
    federate(tmp_path, overrides, 3, lambda run_config: _flaky_app(run_config, garbage), prefix="partition")
    assert _train_metric(run, "clients") == {1: 2.0}
    assert sorted(json.loads((run / "node_keys.json").read_text())) == ["partition-0", "partition-1"]
