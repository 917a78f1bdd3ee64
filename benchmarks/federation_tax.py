"""What does running as a Flower federation cost, compared to the same training in one plain process?

(a) one process, no Flower: every round, each client's local training (fedtune.client.train_round)
    runs in turn, then FedAvg;
(b) the same experiment as an N-client Flower simulation (Ray actors side by side, one core each);
(c) the same simulation with one actor at a time (each client reserves every core), which isolates
    Flower's own cost from the gain of training clients in parallel.

Both do identical local training (same clients, steps, seeds) and the same central evaluations (before
round 1 and after the last round). Writes JSON with wall times, the ratio b/a, bytes sent per client per
round, and where (b)'s extra time goes.

    python benchmarks/federation_tax.py                      # the demo configuration
    python benchmarks/federation_tax.py federation.num_rounds=3 --out benchmarks/results/tax.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from fedtune import adapters, config
from fedtune.aggregation import RoundUpdates, Weighting, weighted_sum
from fedtune.client import train_round
from fedtune.experiment import get_experiment
from fedtune.run_dir import RunDir
from fedtune.simulation import simulate


def in_process(overrides: list[str]) -> dict[str, float]:
    """(a): the federation's training as a plain loop in this process."""
    cfg = config.compose([*overrides, f"run_dir={tempfile.mkdtemp()}"])
    started = time.perf_counter()
    experiment = get_experiment(cfg)
    global_adapter = experiment.initial_adapter()
    strategy = experiment.new_strategy()

    def central() -> None:
        experiment.evaluate(global_adapter, experiment.test_set)

    central()
    train_seconds = 0.0
    for server_round in range(1, experiment.federation.num_rounds + 1):
        updates, weights = [], []
        for partition_id in range(experiment.federation.num_clients):
            update, metrics = train_round(
                experiment,
                experiment.client_data(partition_id),
                global_adapter,
                server_round,
                f"partition-{partition_id}",
            )
            updates.append(update)
            weights.append(metrics["num_examples"])
            train_seconds += metrics["train_seconds"]
        mean = Weighting().mean(weighted_sum(updates, weights), sum(weights), len(updates), global_adapter)
        combined = strategy.aggregate(RoundUpdates(mean, len(updates)), server_round)
        global_adapter = strategy.step(global_adapter, combined, server_round)
    central()
    return {
        "wall_seconds": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "bytes_per_client_per_round": 2 * adapters.num_bytes(global_adapter),
    }


def simulated(overrides: list[str]) -> dict[str, float]:
    """(b): the same experiment as a Flower simulation."""
    run_dir = tempfile.mkdtemp()
    cfg = config.compose([*overrides, f"run_dir={run_dir}"])
    started = time.perf_counter()
    simulate(cfg, config.to_run_config(overrides, run_dir))
    wall = time.perf_counter() - started
    lines = RunDir(run_dir).read_metrics()
    client_train = sum(m["value"] for m in lines if m["scope"].startswith("client:") and m["metric"] == "train_seconds")
    rounds = sum(m["value"] for m in lines if m["metric"] == "round_seconds")
    return {
        "wall_seconds": wall,
        "train_seconds": client_train,
        "rounds_seconds": rounds,
        "startup_and_shutdown_seconds": wall - rounds,
        "bytes_per_client_per_round": 2 * next(m["value"] for m in lines if m["metric"] == "bytes_per_client"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", default="benchmarks/results/federation_tax.json")
    args = parser.parse_args()
    rounds = int(config.compose(args.overrides).federation.num_rounds)
    # Same evaluation work on both sides: central before round 1 and after the last round only.
    overrides = [*args.overrides, "federation.fraction_evaluate=0", f"federation.evaluate_every={rounds}"]
    a = in_process(overrides)
    b = simulated(overrides)
    c = simulated([*overrides, f"federation.cpus_per_client={os.cpu_count() or 1}"])
    result = {
        "overrides": overrides,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "in_process": a,
        "simulation": b,
        "simulation_one_actor_at_a_time": c,
        "ratio_simulation_over_in_process": b["wall_seconds"] / a["wall_seconds"],
        "ratio_serial_simulation_over_in_process": c["wall_seconds"] / a["wall_seconds"],
        "note": "bytes per client per round = global adapter down + float32 update up; train.torch_threads as configured on all sides",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"in-process {a['wall_seconds']:.1f} s | simulation {b['wall_seconds']:.1f} s (ratio {result['ratio_simulation_over_in_process']:.3f}) | "
        f"one actor at a time {c['wall_seconds']:.1f} s (ratio {result['ratio_serial_simulation_over_in_process']:.3f})"
    )
    print(
        f"simulation: {b['startup_and_shutdown_seconds']:.1f} s start-up/shut-down, client training {b['train_seconds']:.1f} s (summed over clients) "
        f"vs {a['train_seconds']:.1f} s in-process | {b['bytes_per_client_per_round'] / 1e6:.2f} MB per client per round"
    )


if __name__ == "__main__":
    main()
