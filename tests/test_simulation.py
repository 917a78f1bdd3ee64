"""Whole federations in Flower's simulation engine: outputs, determinism, resume, failing clients.

The finished run is a real Flower simulation (Ray actors as SuperNodes) of the tiny experiment in conftest.py;
what does not depend on Ray reruns it in-process (tests/nodes.py) and compares.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from fedtune import adapters, cli, client_state, config, transport, wire
from fedtune.client_app import client_key, make_client_app
from fedtune.run_dir import RunDir
from fedtune.secure import identity
from fedtune.secure.session import Session
from fedtune.server_app import make_server_app, run_federation
from tests.conftest import tiny_overrides
from tests.nodes import InProcessGrid, federate, make_nodes


def _run(overrides: list[str]) -> Path:
    assert cli.main(["run", *overrides]) == 0
    return Path(config.compose(overrides).run_dir)


def _final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(max((run_dir / "checkpoints").glob("round-*.pt")), weights_only=True)["adapter"]


@pytest.fixture(scope="module")
def finished_run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Path]:
    overrides = tiny_overrides(tiny_bert_dir, tmp_path_factory.mktemp("sim") / "run")
    return overrides, _run(overrides)


def test_run_writes_every_output(finished_run: tuple[list[str], Path]) -> None:
    _, run_dir = finished_run
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "partitions.json",
        "metrics.png",
        "README.md",
        "baseline.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round-0001.pt", "round-0002.pt"]
    lines = RunDir(run_dir).read_metrics()
    central_rounds = sorted({m["round"] for m in lines if m["scope"] == "central" and m["metric"] == "macro_f1"})
    assert central_rounds == [0, 1, 2]
    clients = [m["value"] for m in lines if m["scope"] == "train" and m["metric"] == "clients"]
    assert clients == [2.0, 2.0]
    assert {m["scope"] for m in lines} >= {"train", "federated", "central", "client:partition-0", "client:partition-1"}
    summary = json.loads((run_dir / "partitions.json").read_text())
    assert [c["id"] for c in summary["clients"]] == ["partition-0", "partition-1"]
    assert summary["train"] + summary["val"] == sum(sum(c["labels"]) for c in summary["clients"])
    card = (run_dir / "README.md").read_text()
    assert "macro_f1" in card and "Differential privacy" in card and "majority-class" in card


def test_saved_config_recomposes_the_same_experiment(finished_run: tuple[list[str], Path]) -> None:
    overrides, run_dir = finished_run
    assert (run_dir / "config.yaml").read_text() == config.to_yaml(config.compose(overrides))


def test_exported_adapter_loads_with_peft_and_equals_the_final_adapter(
    finished_run: tuple[list[str], Path], tiny_bert_dir: Path
) -> None:
    _, run_dir = finished_run
    final = _final_adapter(run_dir)
    exported = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert adapters.fingerprint(exported) == adapters.fingerprint(final)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=22)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    loaded = adapters.get_adapter(model)
    assert all(torch.equal(loaded[k], final[k]) for k in final)


def test_same_config_and_seed_give_a_bit_identical_adapter_in_ray_and_in_process(
    finished_run: tuple[list[str], Path], tmp_path: Path
) -> None:
    """Nothing in the result depends on how clients run: Ray actors in parallel, or one process in turn."""
    overrides, first = finished_run
    second = federate(tmp_path, overrides, 2, prefix="partition")
    assert adapters.fingerprint(_final_adapter(second)) == adapters.fingerprint(_final_adapter(first))
    assert (second / "adapter" / "adapter_model.safetensors").read_bytes() == (
        first / "adapter" / "adapter_model.safetensors"
    ).read_bytes()


def test_resume_after_a_crash_ends_with_the_uninterrupted_adapter(
    finished_run: tuple[list[str], Path], tmp_path: Path
) -> None:
    overrides, uninterrupted = finished_run
    crashed = tmp_path / "run"
    shutil.copytree(uninterrupted, crashed)
    # State of a crash during round 2: round 1's checkpoint is the newest, outputs of round 2 are stale.
    (crashed / "checkpoints" / "round-0002.pt").unlink()
    shutil.rmtree(crashed / "adapter")
    (crashed / "node_keys.json").unlink()  # in-process nodes have identity keys of their own: pin theirs
    resumed = federate(tmp_path, [*overrides, "resume=true"], 2, prefix="partition")
    assert adapters.fingerprint(_final_adapter(resumed)) == adapters.fingerprint(_final_adapter(uninterrupted))
    rounds = [m["round"] for m in RunDir(resumed).read_metrics() if m["scope"] == "train" and m["metric"] == "clients"]
    assert rounds == [1, 2]  # round 2 redone once, not logged twice


def test_starting_over_an_existing_run_is_refused_before_anything_starts(
    finished_run: tuple[list[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    overrides, run_dir = finished_run
    before = (run_dir / "metrics.jsonl").read_bytes()
    assert cli.main(["run", *overrides]) == 2
    assert "resume=true" in capsys.readouterr().err
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_failing_malformed_and_forged_replies_are_skipped_and_the_round_goes_on(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    from flwr.simulation import run_simulation

    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", "federation.num_clients=4")
    run_config = config.to_run_config(overrides, str(tmp_path / "run"))
    real = make_client_app(run_config)
    flaky = ClientApp()
    earlier_replies: dict[str, Message] = {}

    @flaky.query()
    def query(msg: Message, context: Context) -> Message:
        return real(msg, context)

    @flaky.train()
    def train(msg: Message, context: Context) -> Message:
        node, server_round = client_key(context.node_config), msg.content.config_records["config"]["server-round"]
        if (node, server_round) == ("partition-1", 2):
            raise RuntimeError("disk full")  # a hospital's node fails mid-run
        reply = real(msg, context)
        if (node, server_round) == ("partition-2", 1):  # a faulty node sends a poisoned update, validly signed
            update = wire.adapter_of(reply.content.array_records["arrays"])
            update[next(iter(update))].fill_(float("nan"))
            content = RecordDict(
                {"arrays": wire.adapter_record(update), "metrics": reply.content.metric_records["metrics"]}
            )
            config_record = msg.content.config_records["config"]
            session = Session(str(config_record["run-nonce"]), server_round)
            signer = identity.load_or_create(client_state.identity_file(context.node_config, node))
            return Message(wire.sign(content, signer, session, "train", node), reply_to=msg)
        if (node, server_round) == ("partition-3", 1):  # changed in transit after signing
            earlier_replies[node] = reply
            update = wire.adapter_of(reply.content.array_records["arrays"])
            update[next(iter(update))] *= 2
            reply.content.array_records["arrays"] = wire.adapter_record(update)
        if (node, server_round) == ("partition-3", 2):  # round 1's (validly signed) reply replayed
            return Message(earlier_replies[node].content, reply_to=msg)
        return reply

    @flaky.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return real(msg, context)

    run_simulation(
        server_app=make_server_app(run_config),
        client_app=flaky,
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    lines = RunDir(tmp_path / "run").read_metrics()
    scopes = {(m["round"], m["scope"]) for m in lines}
    assert {
        (1, "client:partition-0"),
        (1, "client:partition-1"),
        (2, "client:partition-0"),
        (2, "client:partition-2"),
    } <= scopes
    rejected = {
        (1, "client:partition-2"),
        (1, "client:partition-3"),
        (2, "client:partition-1"),
        (2, "client:partition-3"),
    }
    assert not rejected & scopes  # NaN, tampered, failed and replayed replies never count
    clients = {m["round"]: m["value"] for m in lines if m["scope"] == "train" and m["metric"] == "clients"}
    assert clients == {1: 2.0, 2: 2.0}
    assert all(torch.isfinite(t).all() for t in _final_adapter(tmp_path / "run").values())
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


class _SlowGrid(InProcessGrid):
    """An in-process grid whose node ``slow`` answers ``delay`` seconds after each message was pushed."""

    def __init__(self, nodes: list, slow: int, delay: float) -> None:
        super().__init__(nodes)
        self.slow, self.delay, self.ready_at = slow, delay, {}

    def push_messages(self, messages):  # noqa: ANN001, ANN201 - Grid's signature
        messages = list(messages)
        ids = super().push_messages(messages)
        for message_id, message in zip(ids, messages, strict=True):
            if message.metadata.dst_node_id == self.slow:
                self.ready_at[message_id] = time.monotonic() + self.delay
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        now = time.monotonic()
        return super().pull_messages([i for i in message_ids if self.ready_at.get(i, 0.0) <= now])


def test_a_long_step_says_whom_it_still_waits_for(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a round that takes minutes (a real model), the server's log names the clients it is still waiting for."""
    monkeypatch.setattr(transport, "WAITING_LOG_SECONDS", 0.1)
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", "federation.num_rounds=1")
    nodes = make_nodes(tmp_path, overrides, 2, prefix="partition")
    grid = _SlowGrid(nodes, slow=nodes[1].node_id, delay=0.35)
    with caplog.at_level(logging.INFO, logger="fedtune"):
        run_federation(grid, config.load_experiment(config.to_run_config(overrides, str(tmp_path / "run"))), True)
    waiting = [r.getMessage() for r in caplog.records if "waiting for" in r.getMessage()]
    assert all("1 of 2 replies in" in m for m in waiting)
    assert {m.split(":")[0] for m in waiting} >= {"query", "train", "evaluate"}
    for message in waiting:  # by name once the node is known; at connect only its Flower node id
        assert message.endswith("waiting for node 2" if message.startswith("query") else "waiting for partition-1")
    assert _clients_per_round(tmp_path / "run") == [2.0]  # the slow node's reply still counts


def _clients_per_round(run_dir: Path) -> list[float]:
    return [m["value"] for m in RunDir(run_dir).read_metrics() if m["scope"] == "train" and m["metric"] == "clients"]
