"""Flower ServerApp (Message API): the federated round loop, written out.

Each round: sample clients -> send the global adapter -> collect updates (failed clients are logged
and skipped) -> strategy aggregates and steps -> federated and central evaluation -> metrics,
checkpoint. The loop resumes from the last checkpoint when ``resume=true``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtune import adapters, config, report
from fedtune.adapters import AdapterState
from fedtune.client_app import (
    ARRAYS,
    CLIENT_KEY,
    CONFIG,
    DESCRIPTION,
    EXPERIMENT_HASH,
    METRICS,
    NUM_SAMPLED,
    SERVER_ROUND,
)
from fedtune.data.partition import format_summary
from fedtune.experiment import Experiment, get_experiment
from fedtune.run_dir import Checkpoint, RunDir
from fedtune.seeding import derive_seed, noise_generator

logger = logging.getLogger("fedtune")


# Privacy is reported for the worst-off client, never averaged: each client's epsilon is in its own lines.
_WORST_CASE = ("epsilon", "delta")


class RoundFailedError(RuntimeError):
    """Too few clients replied for a round to count; the last checkpoint is intact for resume."""


@dataclass(frozen=True)
class Client:
    """A connected node as the server knows it."""

    node_id: int
    key: str
    info: dict[str, Any]


def make_server_app(bound_run_config: Mapping[str, Any] | None = None) -> ServerApp:
    """Build the ServerApp; ``bound_run_config`` stands in for Flower's run_config (in-process simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = bound_run_config if bound_run_config is not None else context.run_config
        if not logger.handlers:  # under `flwr run` nothing configured logging; Flower streams our stdout
            logger.addHandler(logging.StreamHandler(sys.stdout))
            logger.setLevel(logging.INFO)
        run_federation(grid, config.load_experiment(run_config))

    return app


def run_federation(grid: Grid, cfg: Any) -> AdapterState:
    """Run (or resume) every round of the experiment ``cfg`` over the nodes of ``grid``; returns the final adapter."""
    experiment = get_experiment(cfg)
    federation = experiment.federation
    run_dir = RunDir(cfg.run_dir)
    run_dir.start(config.to_yaml(cfg), resume=bool(cfg.resume))
    strategy = experiment.new_strategy()
    global_adapter, first_round = experiment.initial_adapter(), 1
    privacy_state: dict[str, Any] = {}  # organisation-level DP accounting (the server's side)
    if cfg.resume:
        checkpoint = run_dir.latest_checkpoint(experiment.hash)
        global_adapter, first_round = checkpoint.adapter, checkpoint.round + 1
        strategy.load_state_dict(checkpoint.strategy_state)
        privacy_state = checkpoint.privacy_state
        logger.info("Resuming %s after round %d", run_dir.path, checkpoint.round)
    clients = _connect(grid, experiment)
    summary = report.partition_summary(experiment, {c.key: c.info for c in clients})
    run_dir.write_json("partitions.json", summary)
    logger.info("Partition summary:\n%s", format_summary(summary))
    if first_round == 1:
        _log_central(run_dir, experiment, global_adapter, 0)
    for server_round in range(first_round, federation.num_rounds + 1):
        started = time.monotonic()
        global_adapter = _train_step(
            grid, experiment, strategy, clients, global_adapter, server_round, run_dir, privacy_state
        )
        checkpoint = Checkpoint(server_round, global_adapter, strategy.state_dict(), experiment.hash, privacy_state)
        run_dir.save_checkpoint(checkpoint)
        central = {}
        if federation.evaluates_after(server_round):
            _federated_evaluation(grid, experiment, clients, global_adapter, server_round, run_dir)
            central = _log_central(run_dir, experiment, global_adapter, server_round)
        seconds = time.monotonic() - started
        run_dir.log_metrics(server_round, "server", {"round_seconds": seconds})
        logger.info(report.progress_line(server_round, federation.num_rounds, run_dir.read_metrics(), central, seconds))
    report.finish(run_dir, experiment, global_adapter)
    return global_adapter


def _connect(grid: Grid, experiment: Experiment) -> list[Client]:
    """Wait for the federation's nodes, then ask each for its name and data description (sorted by name).

    Waits up to ``federation.connect_timeout`` for all ``num_clients`` nodes, then starts with whoever is
    connected if that is at least ``min_train_clients``.
    """
    federation = experiment.federation
    deadline = time.monotonic() + federation.connect_timeout
    while len(list(grid.get_node_ids())) < federation.num_clients and time.monotonic() < deadline:
        time.sleep(1.0)
    connected = len(list(grid.get_node_ids()))
    if connected < federation.min_train_clients:
        raise RoundFailedError(
            f"{connected} nodes connected within federation.connect_timeout={federation.connect_timeout:.0f} s, fewer "
            f"than federation.min_train_clients={federation.min_train_clients}. Start more SuperNodes or lower the minimum."
        )
    if connected < federation.num_clients:
        logger.warning("Starting with %d of federation.num_clients=%d nodes", connected, federation.num_clients)
    replies = _send(
        grid, experiment, grid.get_node_ids(), "query", RecordDict(), timeout=experiment.federation.round_timeout
    )
    clients = [
        Client(
            reply.metadata.src_node_id,
            str(reply.content.config_records[CONFIG][CLIENT_KEY]),
            json.loads(str(reply.content.config_records[CONFIG][DESCRIPTION])),
        )
        for reply in replies
    ]
    return sorted(clients, key=lambda c: c.key)


def _sample(
    clients: list[Client], fraction: float, experiment: Experiment, server_round: int, purpose: str
) -> list[Client]:
    count = experiment.federation.num_sampled(len(clients), fraction)
    generator = torch.Generator().manual_seed(derive_seed(experiment.cfg.seed, purpose, server_round))
    chosen = sorted(torch.randperm(len(clients), generator=generator)[:count].tolist())
    return [clients[i] for i in chosen]


def _train_step(
    grid: Grid,
    experiment: Experiment,
    strategy: Any,
    clients: list[Client],
    global_adapter: AdapterState,
    server_round: int,
    run_dir: RunDir,
    privacy_state: dict[str, Any],
) -> AdapterState:
    sampled = _sample(clients, experiment.federation.fraction_train, experiment, server_round, "train")
    round_config = ConfigRecord({SERVER_ROUND: server_round, NUM_SAMPLED: len(sampled)})
    content = RecordDict({ARRAYS: ArrayRecord(global_adapter), CONFIG: round_config})
    replies = _send(
        grid, experiment, [c.node_id for c in sampled], "train", content, experiment.federation.round_timeout
    )
    by_node = {c.node_id: c for c in sampled}
    updates, weights, train_metrics = [], [], []
    for reply in sorted(replies, key=lambda r: by_node[r.metadata.src_node_id].key):  # fixed order: reproducible sums
        try:
            update, metrics = _read_update(reply, global_adapter)
        except (KeyError, TypeError, ValueError) as error:
            logger.warning(
                "Round %d: update of %s rejected: %s", server_round, by_node[reply.metadata.src_node_id].key, error
            )
            continue
        updates.append(update)
        weights.append(float(metrics["num_examples"]))
        train_metrics.append(metrics)
        run_dir.log_metrics(server_round, f"client:{by_node[reply.metadata.src_node_id].key}", metrics)
    if len(updates) < experiment.federation.min_train_clients:
        raise RoundFailedError(
            f"Round {server_round}: {len(updates)} of {len(sampled)} sampled clients returned an update, fewer than "
            f"federation.min_train_clients={experiment.federation.min_train_clients}. Resume with resume=true once nodes are back."
        )
    organisation = experiment.privacy.organisation
    if organisation is None:
        new_adapter = strategy.step(global_adapter, strategy.aggregate(updates, weights))
    else:  # organisation-level DP: equal weights, a fixed denominator (the sampled count), Gaussian noise
        mean = strategy.aggregate(updates, [1.0] * len(updates))
        mean = {k: v * (len(updates) / len(sampled)) for k, v in mean.items()}
        noise = noise_generator(
            privacy_state, organisation.reproducible_seed(experiment.cfg.seed), "client_dp_server", server_round
        )
        new_adapter = strategy.step(global_adapter, organisation.privatize_aggregate(mean, len(sampled), noise))
        epsilon = organisation.account(privacy_state, len(sampled) / len(clients), len(clients))
        run_dir.log_metrics(server_round, "server", {"client_dp_epsilon": epsilon})
    run_dir.log_metrics(
        server_round,
        "train",
        {
            **_weighted_mean([{k: v for k, v in m.items() if k not in _WORST_CASE} for m in train_metrics], weights),
            **{f"{k}_max": max(m[k] for m in train_metrics) for k in _WORST_CASE if k in train_metrics[0]},
            "clients": float(len(updates)),
            "sampled": float(len(sampled)),
            "bytes_per_client": float(adapters.num_bytes(global_adapter)),
        },
    )
    return new_adapter


def _read_update(reply: Message, global_adapter: AdapterState) -> tuple[AdapterState, dict[str, float]]:
    """The update and metrics of a train reply, refused if malformed (wrong tensors, non-finite values, bad weight)."""
    update = reply.content.array_records[ARRAYS].to_torch_state_dict()
    adapters.check_update(update, global_adapter)
    metrics = dict(reply.content.metric_records[METRICS])
    metrics["update_norm"] = adapters.l2_norm(update)
    weight = float(metrics["num_examples"])
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"num_examples={weight} must be a positive number.")
    return update, metrics


def _federated_evaluation(
    grid: Grid,
    experiment: Experiment,
    clients: list[Client],
    global_adapter: AdapterState,
    server_round: int,
    run_dir: RunDir,
) -> None:
    if experiment.federation.fraction_evaluate == 0:
        return
    sampled = _sample(clients, experiment.federation.fraction_evaluate, experiment, server_round, "evaluate")
    replies = _send(
        grid,
        experiment,
        [c.node_id for c in sampled],
        "evaluate",
        RecordDict({ARRAYS: ArrayRecord(global_adapter)}),
        experiment.federation.round_timeout,
    )
    results = [dict(r.content.metric_records[METRICS]) for r in replies]
    if len(results) < experiment.federation.min_evaluate_clients:
        logger.warning("Round %d: federated evaluation skipped, %d replies", server_round, len(results))
        return
    run_dir.log_metrics(server_round, "federated", _weighted_mean(results, [m["num_examples"] for m in results]))


def _log_central(
    run_dir: RunDir, experiment: Experiment, global_adapter: AdapterState, server_round: int
) -> dict[str, float]:
    """Evaluate the global adapter on the central held-out test set."""
    metrics = experiment.evaluate(global_adapter, experiment.test_set)
    run_dir.log_metrics(server_round, "central", metrics)
    return metrics


def _send(
    grid: Grid, experiment: Experiment, node_ids: Iterable[int], message_type: str, content: RecordDict, timeout: float
) -> list[Message]:
    """Send one message per node and return the successful replies; failures are logged and skipped."""
    content.config_records.setdefault(CONFIG, ConfigRecord())
    content.config_records[CONFIG][EXPERIMENT_HASH] = experiment.hash
    messages = [Message(content=content, dst_node_id=node_id, message_type=message_type) for node_id in node_ids]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    ok = []
    for reply in replies:
        if reply.has_error():
            logger.warning(
                "Node %s failed a %s message and is skipped this round: %s",
                reply.metadata.src_node_id,
                message_type,
                reply.error.reason,
            )
        else:
            ok.append(reply)
    if len(replies) < len(messages):
        logger.warning(
            "%d of %d nodes did not answer the %s message within %.0f s",
            len(messages) - len(replies),
            len(messages),
            message_type,
            timeout,
        )
    return ok


def _weighted_mean(metrics: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    total = sum(weights) or 1.0
    keys = [k for k in metrics[0] if k != "num_examples"] if metrics else []
    return {k: sum(m[k] * w for m, w in zip(metrics, weights, strict=True)) / total for k in keys}


app = make_server_app()
