"""Is the federation worth joining? Centralized, local-only and federated training side by side.

Every arm starts from the same base model and seeded adapter, trains on rows of one data split, and is
evaluated on the same central test set (rows no hospital holds):

- centralized: one trainer on the union of the hospitals' training rows (the ceiling);
- local-only: each hospital alone on its own training rows (the alternative a hospital really has); the
  table gives the best hospital of each seed and the mean over hospitals;
- federated: the hospitals together, with each strategy in ``--strategies`` (FedAvg by default).

The budget is equal compute: a hospital alone takes the steps it takes in the federation (rounds x local
steps), the centralized trainer the federation's total (clients per round x rounds x local steps), all at
the same batch size and learning rate. Each ``--privacy`` entry runs every arm under that mechanism:
``privacy=dp_sgd privacy.target_epsilon=8`` gives each federated hospital and each hospital alone epsilon
8 over its own rows, and the centralized trainer epsilon 8 over the pooled rows (the reference that DP
federated training is compared with). The local-only arm without DP is the bar a DP federation must
clear: a hospital that trains alone needs no DP, as nothing leaves the building.

    python benchmarks/quality.py                                   # no DP and DP-SGD at epsilon 8, 3 seeds
    python benchmarks/quality.py --privacy privacy=none "privacy=dp_sgd privacy.target_epsilon=1" --seeds 0
    python benchmarks/quality.py --no-hospitals --extra model.pooling=mean --out /tmp/mean_pooling.json
    python benchmarks/quality.py --extra data=hpo_systems --out benchmarks/results/quality_hpo.json

Writes JSON (every run, the summary, the machine), a markdown table beside it (``.md``) and a plot of
macro-F1 against epsilon (``.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from compare_strategies import SCALE, run_one

from fedtune import adapters, client, config
from fedtune.data.partition import ClientData
from fedtune.experiment import Experiment, get_experiment

METRICS = ("macro_f1", "accuracy")


@dataclass(frozen=True)
class SoloArm:
    """One trainer alone: its name, the rows it trains on and how many steps it takes."""

    name: str
    rows: ClientData
    steps: int


def solo_arms(experiment: Experiment) -> list[SoloArm]:
    """The centralized trainer and each hospital alone, on the federation's own split and at equal compute."""
    federation, local_steps = experiment.federation, experiment.train_config.local_steps
    clients = [experiment.client_data(partition) for partition in range(federation.num_clients)]
    per_round = federation.num_sampled(federation.num_clients, federation.fraction_train)
    union = ClientData(
        datasets.concatenate_datasets([data.train for data in clients]),
        datasets.concatenate_datasets([data.val for data in clients]),
    )
    alone = [
        SoloArm(f"hospital-{partition}", data, federation.num_rounds * local_steps)
        for partition, data in enumerate(clients)
    ]
    return [SoloArm("centralized", union, per_round * federation.num_rounds * local_steps), *alone]


def train_alone(overrides: list[str], arm: SoloArm, test_set: datasets.Dataset) -> dict[str, float]:
    """Train ``arm`` as one client's single long round (``client.train_round``, so DP-SGD calibrates its
    noise for exactly these steps on these rows); its metrics on the federation's central ``test_set``."""
    solo = get_experiment(config.compose([*overrides, f"train.local_steps={arm.steps}", "federation.num_rounds=1"]))
    initial = solo.initial_adapter()
    update, metrics = client.train_round(solo, arm.rows, initial, 1, arm.name, privacy_state={})
    central = solo.evaluate(adapters.apply(initial, update), test_set)
    return {
        **{metric: central[metric] for metric in METRICS},
        "steps": float(arm.steps),
        "train_rows": float(len(arm.rows.train)),
        **({"epsilon": metrics["epsilon"]} if "epsilon" in metrics else {}),
    }


def run_seed(
    seed: int, privacy: str, strategies: list[str], base: list[str], root: Path, hospitals: bool = True
) -> dict[str, dict]:
    """Every arm for one seed under one privacy setting (``root``: this setting's own directory; without
    ``hospitals``, not the hospitals alone)."""
    overrides = [*base, *shlex.split(privacy), f"seed={seed}", f"run_dir={root / 'solo'}"]
    experiment = get_experiment(config.compose(overrides))
    solo = solo_arms(experiment) if hospitals else solo_arms(experiment)[:1]
    results: dict[str, dict] = {arm.name: train_alone(overrides, arm, experiment.test_set) for arm in solo}
    for strategy in strategies:
        federated = run_one(strategy, seed, [*base, *shlex.split(privacy)], root)
        results[f"federated:{strategy}"] = {metric: federated[metric] for metric in METRICS}
    return results


def summarise(runs: list[dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Per arm: mean, sample standard deviation and worst seed; for the hospitals alone also the best one of
    each seed (the partition changes with the seed, so hospital-0 of two seeds are different hospitals) and
    the mean over hospitals."""
    arms: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        for arm, values in run.items():
            arms.setdefault(arm, []).append(values)
    hospitals = sorted(arm for arm in arms if arm.startswith("hospital-"))
    if hospitals:
        arms["best hospital alone"] = [max((run[h] for h in hospitals), key=lambda v: v["macro_f1"]) for run in runs]
        arms["hospitals alone (mean)"] = [
            {metric: statistics.mean(arms[h][i][metric] for h in hospitals) for metric in METRICS}
            for i in range(len(runs))
        ]
    summary: dict[str, dict] = {}
    for arm, values in arms.items():
        summary[arm] = {"seeds": len(values)}
        for metric in METRICS:
            column = [v[metric] for v in values]
            summary[arm][f"{metric}_mean"] = statistics.mean(column)
            summary[arm][f"{metric}_std"] = statistics.stdev(column) if len(column) > 1 else 0.0
            summary[arm][f"{metric}_min"] = min(column)
    return summary


def table(summaries: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per arm, one column per privacy setting (macro-F1 mean ± sd with the worst seed, then
    accuracy mean ± sd; the header says over how many seeds)."""
    settings = list(summaries)
    order = ["centralized", *[a for a in summaries[settings[0]] if a.startswith("federated:")]]
    order += [a for a in ("best hospital alone", "hospitals alone (mean)") if a in summaries[settings[0]]]
    seeds = [summaries[s]["centralized"]["seeds"] for s in settings]
    rows = [
        "| arm | "
        + " | ".join(f"macro-F1 / accuracy, {s} ({n} seeds)" for s, n in zip(settings, seeds, strict=True))
        + " |",
        "|---|" + "---|" * len(settings),
    ]
    for arm in order:
        cells = []
        for setting in settings:
            s = summaries[setting][arm]
            cells.append(
                f"{s['macro_f1_mean']:.3f} ± {s['macro_f1_std']:.3f} ({s['macro_f1_min']:.3f}) / "
                f"{s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f}"
            )
        rows.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def epsilon_of(privacy: str) -> float:
    """The epsilon a privacy setting names (infinity without DP), for the plot's axis."""
    for token in shlex.split(privacy):
        if token.startswith("privacy.target_epsilon="):
            return float(token.split("=", 1)[1])
    return float("inf")


def plot(summaries: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    """Macro-F1 against epsilon (no DP drawn at the right), one line per arm, one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted(summaries, key=epsilon_of)
    finite = [epsilon_of(s) for s in settings if epsilon_of(s) != float("inf")]
    no_dp_at = 2 * max(finite) if finite else 1.0
    xs = [epsilon_of(s) if epsilon_of(s) != float("inf") else no_dp_at for s in settings]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for arm in summaries[settings[0]]:
        if arm.startswith("hospital-"):
            continue
        means = [summaries[s][arm]["macro_f1_mean"] for s in settings]
        spreads = [summaries[s][arm]["macro_f1_std"] for s in settings]
        axes.errorbar(xs, means, yerr=spreads, marker="o", capsize=3, label=arm)
    axes.set_xscale("log")
    axes.set_xticks(xs, [f"{x:g}" if x != no_dp_at else "no DP" for x in xs])
    axes.set_xlabel("epsilon per hospital (record-level DP-SGD)")
    axes.set_ylabel("central test macro-F1")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    """Run every arm for every seed and privacy setting; write JSON, the table and the plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default="fedavg", help="comma-separated conf/strategy names")
    parser.add_argument("--privacy", nargs="+", default=["privacy=none", "privacy=dp_sgd privacy.target_epsilon=8"])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides, applied to every arm")
    parser.add_argument("--no-hospitals", action="store_true", help="skip the hospitals alone (a quicker comparison)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quality.json"))
    args = parser.parse_args()
    strategies, seeds = args.strategies.split(","), [int(s) for s in args.seeds.split(",")]
    base = [*SCALE, *args.extra]
    runs: dict[str, list[dict[str, dict]]] = {}
    with tempfile.TemporaryDirectory() as root:
        for seed in seeds:  # seeds outermost, results written after each: a cut-short run keeps what it has
            for index, privacy in enumerate(args.privacy):
                directory = Path(root) / f"privacy-{index}"
                results = run_seed(seed, privacy, strategies, base, directory, not args.no_hospitals)
                runs.setdefault(privacy, []).append(results)
                write(args.out, base, seeds, runs)


def write(out: Path, overrides: list[str], seeds: list[int], runs: dict[str, list[dict[str, dict]]]) -> None:
    """The JSON, the markdown table and the plot of the runs so far (each summary says over how many seeds)."""
    summaries = {privacy: summarise(results) for privacy, results in runs.items()}
    markdown = table(summaries)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    record = {"overrides": overrides, "seeds": seeds, "machine": machine, "summary": summaries, "runs": runs}
    out.write_text(json.dumps(record, indent=2))
    out.with_suffix(".md").write_text(markdown + "\n")
    plot(summaries, out.with_suffix(".png"))
    print(markdown, flush=True)


if __name__ == "__main__":
    main()
