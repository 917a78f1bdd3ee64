"""The federated round loop, with no Flower in it: who trains, what they are told, how their updates combine.

Each round: sample clients -> the strategy configures each one -> the channel collects their updates (in
the clear or masked; fedtune/channel.py) -> the weighted mean, organisation-level DP noise and accounting
-> the strategy aggregates and steps -> checkpoint -> federated and central evaluation -> metrics -> a
ledger entry. Every check that must hold whatever launched the run (a CLI simulation, ``flwr run``, a
deployment) runs here. ``resume=true`` continues from the last checkpoint recorded in the ledger.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from fedtune import adapters, config, portable, report
from fedtune.adapters import AdapterState
from fedtune.aggregation import RoundUpdates
from fedtune.anomalies import update_statistics
from fedtune.assets import cache_dir
from fedtune.channel import Channel, Client, RoundAbandoned, RoundFailedError, TrainRequest
from fedtune.client_settings import ClientSettings
from fedtune.contribution import rounds as contribution_rounds
from fedtune.data.partition import format_summary
from fedtune.evaluation import TOKENS, federated_metrics
from fedtune.experiment import Experiment, get_experiment
from fedtune.federation import Federation
from fedtune.interfaces import Strategy
from fedtune.ledger import Ledger, file_hash, metrics_hash
from fedtune.run_dir import Checkpoint, RunDir
from fedtune.secure import identity
from fedtune.secure.identity import Identity
from fedtune.seeding import derive_seed, noise_generator

logger = logging.getLogger("fedtune")

# Privacy is reported for the worst-off client, never averaged: each client's epsilon is in its own lines.
_WORST_CASE = ("epsilon", "delta")


def run(channel: Channel, cfg: DictConfig) -> AdapterState:
    """Run (or resume) every round of the experiment ``cfg`` over ``channel``; returns the final adapter."""
    experiment = get_experiment(cfg)
    experiment.check_composition()  # here, not only in the CLI: `flwr run` and deployments start here
    federation = experiment.federation
    run_dir = RunDir(cfg.run_dir)
    run_dir.start(config.to_yaml(cfg), resume=bool(cfg.resume))
    ledger = Ledger(run_dir.path, signer=_server_identity(federation))
    strategy = experiment.new_strategy()
    global_adapter, first_round = experiment.initial_adapter(), 1
    privacy_state: dict[str, Any] = {}  # organisation-level DP accounting (the server's side, checkpointed)
    secrets = run_dir.secrets()  # the server's DP noise and sampling secret: a private file, never in a checkpoint
    unfinished = None  # a round aggregated and checkpointed, but not yet evaluated and in the ledger
    if cfg.resume:
        checkpoint = run_dir.latest_checkpoint(experiment.hash, at_most=ledger.last_round() + 1)
        if checkpoint is not None:
            global_adapter, first_round = checkpoint.adapter, checkpoint.round + 1
            strategy.load_state_dict(checkpoint.strategy_state)
            privacy_state = checkpoint.privacy_state
            if checkpoint.round > ledger.last_round():  # never aggregate a round again: complete it
                unfinished = checkpoint
                run_dir.drop_evaluation(checkpoint.round)
        ledger.truncate(first_round - 1)
        logger.info("Resuming %s after round %d", run_dir.path, first_round - 1)
    # From cfg, not the experiment: an Experiment is shared by runs that differ in bookkeeping keys only.
    tracker = config.instantiate(cfg.tracker).open(run_dir.path, run_dir.read_metrics(), resumed=bool(cfg.resume))
    run_dir.track(tracker)  # only the server runs this loop, so only the server logs to a tracker
    try:
        if not experiment.secure.masked:
            logger.warning("secure=none: the server sees every client's update; secure=masking shows it only their sum")
        portable.warn_if_unnamed(experiment.model_spec)
        clients = channel.connect(run_dir, resume=bool(cfg.resume))
        if not experiment.secure.masked:
            summary = report.partition_summary(experiment, {c.key: c.info for c in clients})
            run_dir.write_json("partitions.json", summary)
            logger.info("Partition summary:\n%s", format_summary(summary))
        opening = {}  # contribution accounting's validation rows and fixed groups, fixed for the run
        if experiment.contribution.enabled:
            entries = ledger.entries()
            opening = entries[0]["contribution"] if entries else contribution_rounds.start(experiment, clients, secrets)
        groups = contribution_rounds.fixed_groups(opening)
        if groups is not None:  # a node that joins a resumed run is in no group: it cannot be masked with anyone
            grouped = {name for group in groups for name in group}
            if any(c.key not in grouped for c in clients):
                logger.warning(
                    "%s are in none of the run's fixed groups; they do not train",
                    [c.key for c in clients if c.key not in grouped],
                )
            clients = [c for c in clients if c.key in grouped]
        if ledger.last_round() < 0:
            _log_central(run_dir, experiment, global_adapter, 0)
            ledger.append(
                "start",
                0,
                config_hash=experiment.hash,
                config_file=file_hash(run_dir.path / "config.yaml"),
                aggregate=adapters.fingerprint(global_adapter),
                metrics=metrics_hash(run_dir.metrics_file, 0),
                **({"contribution": opening} if opening else {}),
            )
        if unfinished is not None:
            path = run_dir.checkpoints / f"round-{unfinished.round:04d}.pt"
            _complete_round(channel, experiment, strategy, clients, run_dir, ledger, unfinished, path, time.monotonic())
        for server_round in range(first_round, federation.num_rounds + 1):
            started = time.monotonic()
            global_adapter, record = _train_step(
                channel,
                experiment,
                strategy,
                clients,
                global_adapter,
                server_round,
                run_dir,
                privacy_state,
                secrets,
                groups,
            )
            checkpoint = Checkpoint(
                server_round, global_adapter, strategy.state_dict(), experiment.hash, privacy_state, record
            )
            checkpoint_path = run_dir.save_checkpoint(checkpoint)
            _complete_round(
                channel, experiment, strategy, clients, run_dir, ledger, checkpoint, checkpoint_path, started
            )
        contributions = {}
        if experiment.contribution.enabled:
            rounds = [e["contribution"] for e in ledger.entries() if e["kind"] == "round" and "contribution" in e]
            contributions = {"contribution": contribution_rounds.finish(experiment, rounds, secrets)}
        report.finish(run_dir, experiment, global_adapter, contributions.get("contribution"))
        adapter_files = [p for p in sorted((run_dir.path / "adapter").rglob("*")) if p.is_file()]
        exported = [*adapter_files, run_dir.path / "README.md"]
        head = ledger.append(
            "export",
            federation.num_rounds,
            adapter=adapters.fingerprint(global_adapter),
            files={str(p.relative_to(run_dir.path)): file_hash(p) for p in exported},
            **contributions,
        )
        logger.info(
            "Ledger head %s: publish it; `fedtune audit %s --head HASH` checks the run against it",
            head["hash"],
            run_dir.path,
        )
    except BaseException:
        tracker.close(failed=True)
        raise
    tracker.close(failed=False)
    return global_adapter


def _complete_round(
    channel: Channel,
    experiment: Experiment,
    strategy: Strategy,
    clients: list[Client],
    run_dir: RunDir,
    ledger: Ledger,
    checkpoint: Checkpoint,
    checkpoint_path: Path,
    started: float,
) -> None:
    """Evaluate a checkpointed round, log it and enter it in the ledger (also when a resume finds a round
    whose aggregate was saved before the server stopped)."""
    federation, server_round, adapter = experiment.federation, checkpoint.round, checkpoint.adapter
    central = {}
    if federation.evaluates_after(server_round):
        _federated_evaluation(channel, experiment, strategy, clients, adapter, server_round, run_dir)
        central = _log_central(run_dir, experiment, adapter, server_round)
    seconds = time.monotonic() - started
    run_dir.log_metrics(server_round, "server", {"round_seconds": seconds})
    ledger.append(
        "round",
        server_round,
        **checkpoint.record,
        config_hash=experiment.hash,
        aggregate=adapters.fingerprint(adapter),
        checkpoint_file=str(checkpoint_path.relative_to(run_dir.path)),
        checkpoint=file_hash(checkpoint_path),
        metrics=metrics_hash(run_dir.metrics_file, server_round),
    )
    logger.info(report.progress_line(server_round, federation.num_rounds, run_dir.read_metrics(), central, seconds))


def _server_identity(federation: Any) -> Identity:
    """The server's identity key: it signs the ledger (``federation.server_identity_key``)."""
    path = federation.server_identity_key or cache_dir() / "server-identity.pem"
    return identity.load_or_create(Path(path))


def _sample(
    clients: list[Client],
    fraction: float,
    experiment: Experiment,
    server_round: int,
    purpose: str,
    secrets: dict[str, Any],
) -> list[Client]:
    """The clients of one step. Under organisation-level DP the training sample has the planned size whoever
    connected (the accountant charges for that: fedtune/privacy/client_dp.py) and is drawn from the server's
    secret, so that who trains in a round cannot be foretold from the public config."""
    organisation = experiment.privacy.organisation
    if organisation is not None and purpose == "train":
        planned = _planned(experiment.federation)
        count = len(clients) if planned is None else min(len(clients), planned)
        generator = noise_generator(
            secrets, organisation.reproducible_seed(experiment.cfg.seed), "sample", server_round
        )
    else:
        count = experiment.federation.num_sampled(len(clients), fraction)
        generator = torch.Generator().manual_seed(derive_seed(experiment.cfg.seed, purpose, server_round))
    chosen = sorted(torch.randperm(len(clients), generator=generator)[:count].tolist())
    return [clients[i] for i in chosen]


def _planned(federation: Federation) -> int | None:
    """The organisations a training round samples under organisation-level DP: None when every connected one
    trains (one more would train too, so none takes another's place)."""
    return None if federation.fraction_train == 1 else federation.planned_train_clients()


def _train_step(
    channel: Channel,
    experiment: Experiment,
    strategy: Strategy,
    clients: list[Client],
    global_adapter: AdapterState,
    server_round: int,
    run_dir: RunDir,
    privacy_state: dict[str, Any],
    secrets: dict[str, Any],
    groups: tuple[tuple[str, ...], ...] | None,
) -> tuple[AdapterState, dict[str, Any]]:
    """One round's training: sample, configure, collect, combine, step. Returns the new global adapter and the
    round's ledger fields. With ``groups`` (contribution accounting under masking) updates are masked within
    each group."""
    federation, organisation = experiment.federation, experiment.privacy.organisation
    sampled = _sample(clients, federation.fraction_train, experiment, server_round, "train", secrets)
    settings = {client.key: strategy.configure(server_round, client.key) for client in sampled}
    next_clients = None  # a masked channel has the next round's clients make its keys during this one
    if server_round < federation.num_rounds:
        next_clients = _sample(clients, federation.fraction_train, experiment, server_round + 1, "train", secrets)
    layout = _upload_layout(settings, global_adapter, server_round)
    request = TrainRequest(server_round, global_adapter, settings, layout, experiment.weighting, next_clients, groups)
    try:
        collected = channel.train(sampled, request)
    except RoundAbandoned as error:  # clients uploaded, so the round is recorded, never retried
        logger.warning("%s", error)
        privacy = {}
        if error.revealed and organisation is not None and organisation.noise_at == "clients":
            # the server saw a sum carrying the clients' noise: a release, though never applied
            privacy["client_dp_epsilon"] = organisation.charge_round(
                privacy_state, _planned(federation), len(clients), error.revealed, error.round_size
            )
            run_dir.log_metrics(server_round, "server", privacy)
        run_dir.log_metrics(server_round, "train", {"abandoned": 1.0, "sampled": float(len(sampled))})
        return global_adapter, {"abandoned": str(error), "participants": [], "received": {}, "privacy": privacy}
    contributions = collected.contributions
    if len(contributions) < federation.min_train_clients:
        raise RoundFailedError(
            f"Round {server_round}: {len(contributions)} of {len(sampled)} sampled clients returned an update, fewer "
            f"than federation.min_train_clients={federation.min_train_clients}. Resume with resume=true once nodes are back."
        )
    individual, weights = collected.individual or (None, None)
    statistics = update_statistics(individual, weights) if individual else [{} for _ in contributions]
    for contribution, seen in zip(contributions, statistics, strict=True):  # the anomaly log (plaintext only)
        run_dir.log_metrics(server_round, f"client:{contribution.client.key}", {**contribution.metrics, **seen})
    # Under organisation-level DP the mean divides by the planned round size, which is public; a count of who
    # came would move with the federation and tell.
    divisor = federation.planned_train_clients() if organisation is not None else collected.round_size
    mean = experiment.weighting.mean(collected.weighted_sum, collected.total_weight, divisor, layout)
    privacy: dict[str, float] = {}
    if organisation is not None:  # Gaussian noise on the mean (unless the clients already added it)
        noise = noise_generator(
            secrets, organisation.reproducible_seed(experiment.cfg.seed), "client_dp_server", server_round
        )
        mean = organisation.privatize_aggregate(mean, divisor, noise)
        privacy["client_dp_epsilon"] = organisation.charge_round(  # fewer uploads, less noise (noise_at=clients)
            privacy_state, _planned(federation), len(clients), len(contributions), collected.round_size
        )
        run_dir.log_metrics(server_round, "server", privacy)
    train_metrics = [c.metrics for c in contributions]
    summary = {  # metric means weigh clients as the sum did; masked, example counts stay private: equally
        **_weighted_mean(
            [{k: v for k, v in m.items() if k not in _WORST_CASE} for m in train_metrics],
            list(weights) if weights is not None else [1.0] * len(train_metrics),
        ),
        **{f"{k}_max": max(m[k] for m in train_metrics) for k in _WORST_CASE if k in train_metrics[0]},
        "clients": float(len(contributions)),
        "sampled": float(len(sampled)),
        "bytes_per_client": float(adapters.num_bytes(global_adapter)),
        "upload_bytes_per_client": float(collected.upload_bytes),
        **collected.extra,
    }
    run_dir.log_metrics(server_round, "train", summary)
    privacy.update({f"{k}_max": summary[f"{k}_max"] for k in _WORST_CASE if f"{k}_max" in summary})
    record = {
        "participants": [c.client.key for c in contributions],
        "run_nonce": channel.run_nonce,  # with the round, what each reply signature is bound to
        "received": {
            c.client.key: {"digest": c.digest, "signature": c.signature.hex(), "key": c.client.public_key}
            for c in contributions
        },
        "privacy": privacy,
    }
    if experiment.contribution.enabled:  # before the strategy moves on: coalitions step from its current state
        record["contribution"] = contribution_rounds.account_round(
            experiment,
            strategy.state_dict(),
            collected,
            global_adapter,
            layout,
            server_round,
            channel.run_nonce,
            divisor if organisation is not None else None,
            run_dir,
        )
    updates = RoundUpdates(mean, len(contributions), individual, weights, global_adapter)
    combined = strategy.aggregate(updates, server_round)
    return strategy.step(global_adapter, combined, server_round), record


def _upload_layout(
    settings: dict[str, ClientSettings], global_adapter: AdapterState, server_round: int
) -> AdapterState:
    """The tensors every client of the round uploads (one layout: a sum, masked or not, is over one layout).

    Raises:
        ValueError: The strategy's settings freeze what does not exist, everything, or differ between clients.
    """
    layouts = {tuple(s.uploaded(global_adapter)) for s in settings.values()}
    for client_settings in settings.values():
        client_settings.check(global_adapter)
    if len(layouts) > 1:
        raise ValueError(
            f"Round {server_round}: the strategy has clients upload different tensors; a round sums one layout."
        )
    return next(iter(settings.values())).uploaded(global_adapter)


def _federated_evaluation(
    channel: Channel,
    experiment: Experiment,
    strategy: Strategy,
    clients: list[Client],
    global_adapter: AdapterState,
    server_round: int,
    run_dir: RunDir,
) -> None:
    if experiment.federation.fraction_evaluate == 0:
        return
    sampled = _sample(clients, experiment.federation.fraction_evaluate, experiment, server_round, "evaluate", {})
    settings = {client.key: strategy.configure(server_round, client.key) for client in sampled}
    results = channel.evaluate(sampled, global_adapter, server_round, settings)
    if len(results) < experiment.federation.min_evaluate_clients:
        logger.warning("Round %d: federated evaluation skipped, %d replies", server_round, len(results))
        return
    weights = [m.get("num_examples", 1.0) for m in results]  # without sizes (secure=masking) clients count equally
    run_dir.log_metrics(server_round, "federated", federated_metrics(results, _weighted_mean(results, weights)))


def _log_central(
    run_dir: RunDir, experiment: Experiment, global_adapter: AdapterState, server_round: int
) -> dict[str, float]:
    """Evaluate the global adapter on the central held-out test set."""
    metrics = experiment.evaluate(global_adapter, experiment.test_set)
    run_dir.log_metrics(server_round, "central", metrics)
    return metrics


def _weighted_mean(metrics: list[dict[str, float]], weights: list[float]) -> dict[str, float]:
    total = sum(weights) or 1.0
    keys = [k for k in metrics[0] if k not in ("num_examples", TOKENS)] if metrics else []
    return {k: sum(m[k] * w for m, w in zip(metrics, weights, strict=True)) / total for k in keys}
