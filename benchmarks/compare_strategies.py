"""Every federated method on the same task, side by side: quality over seeds, upload size and round time.

Each strategy in ``conf/strategy/`` runs the same federation (4 hospitals, Dirichlet 0.5 label skew, the
same rounds, local steps, learning rate and seeds) as a real Flower simulation, exactly as
``fedtune run strategy=NAME`` would. The table reports, after the last round, the central test set's
macro-F1 and accuracy and the federated macro-F1 (each client's validation split, clients weighted by
size; personalised for FedSA-LoRA, whose clients keep B and the head, so its central numbers are of the
shared part alone), each as the mean and sample standard deviation over seeds and the worst seed, then
the bytes each client uploads per round and the mean round time; the untrained model is the floor.

    python benchmarks/compare_strategies.py                              # every strategy, 3 seeds, ICD-10 chapters
    python benchmarks/compare_strategies.py --strategies fedavg,ffa_lora --seeds 0,1 --out /tmp/s.json
    python benchmarks/compare_strategies.py --extra secure=masking       # the same comparison under secure aggregation

Writes JSON (every run's numbers, the summary and the machine), a markdown table beside it (``.md``) and
a plot (``.png``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedtune import cli, config
from fedtune.run_dir import RunDir

# A reduced demo: the demo's federation and model, fewer rounds and steps, so that 8 methods x 3 seeds fit
# in about an hour on two CPU cores.
SCALE = [
    "federation.num_clients=4",
    "partition=dirichlet",
    "partition.alpha=0.5",
    "federation.num_rounds=6",
    "train.local_steps=10",
    "data.loader.max_examples=4000",
    "data.test_size=500",
    "train.eval_max_examples=500",
    "federation.fraction_evaluate=1",  # central and federated evaluation, after the last round only
    "federation.evaluate_every=1000",
]
# Methods whose clients keep part of the model (FedSA-LoRA: B and the head): the central test set sees only the
# shared part, so their federated metric (each client's own model) is the one that counts.
PERSONALISED = ("fedsa_lora",)


def run_one(strategy: str, seed: int, overrides: list[str], root: Path) -> dict[str, float]:
    """One federation; returns its final central metrics (and before training, as ``untrained_*``), upload
    bytes per client per round and round time."""
    run_dir = root / f"{strategy}-seed{seed}"
    started = time.perf_counter()
    code = cli.main(["run", *overrides, f"strategy={strategy}", f"seed={seed}", f"run_dir={run_dir}"])
    if code != 0:
        raise RuntimeError(f"strategy={strategy} seed={seed} failed (exit {code}); see the log above")
    lines = RunDir(run_dir).read_metrics()
    last = max(line["round"] for line in lines)

    def values(scope: str, metric: str) -> list[float]:
        return [line["value"] for line in lines if line["scope"] == scope and line["metric"] == metric]

    def final(scope: str, at: int = last) -> dict[str, float]:
        return {line["metric"]: line["value"] for line in lines if line["scope"] == scope and line["round"] == at}

    central, federated, untrained = final("central"), final("federated"), final("central", 0)
    return {
        **central,  # the task's metrics: macro_f1 and accuracy, or a causal LM's perplexity and exact_match
        "federated_macro_f1": federated.get("macro_f1", float("nan")),
        **{f"untrained_{metric}": value for metric, value in untrained.items()},
        "upload_bytes_per_client": statistics.mean(values("train", "upload_bytes_per_client")),
        "download_bytes_per_client": statistics.mean(values("train", "bytes_per_client")),
        "round_seconds": statistics.mean(values("server", "round_seconds")),
        "wall_seconds": time.perf_counter() - started,
    }


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    """Mean, sample standard deviation and worst seed of the quality metrics; means of the costs."""
    summary: dict[str, float] = {"seeds": len(runs)}
    for metric in ("macro_f1", "accuracy", "federated_macro_f1"):
        values = [run[metric] for run in runs]
        summary[f"{metric}_mean"] = statistics.mean(values)
        summary[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[f"{metric}_min"] = min(values)
    for metric in ("upload_bytes_per_client", "download_bytes_per_client", "round_seconds"):
        summary[metric] = statistics.mean(run[metric] for run in runs)
    return summary


def ranked(summaries: dict[str, dict[str, float]]) -> list[tuple[str, dict[str, float]]]:
    """The strategies, best central macro-F1 first (the order of the table and the plot's legend)."""
    return sorted(summaries.items(), key=lambda item: -item[1]["macro_f1_mean"])


def table(summaries: dict[str, dict[str, float]], floor: dict[str, float]) -> str:
    """The markdown table: one row per strategy, uploads relative to FedAvg's."""
    reference = summaries.get("fedavg", next(iter(summaries.values())))["upload_bytes_per_client"]
    rows = [
        "| strategy | central macro-F1 (mean ± sd, worst) | central accuracy (mean ± sd) | federated macro-F1 "
        "(mean ± sd) | upload / client / round | vs FedAvg | round time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in ranked(summaries):
        personalised = " (personalised)" if name in PERSONALISED else ""
        rows.append(
            f"| `{name}` | {s['macro_f1_mean']:.3f} ± {s['macro_f1_std']:.3f} ({s['macro_f1_min']:.3f}) "
            f"| {s['accuracy_mean']:.3f} ± {s['accuracy_std']:.3f} "
            f"| {s['federated_macro_f1_mean']:.3f} ± {s['federated_macro_f1_std']:.3f}{personalised} "
            f"| {s['upload_bytes_per_client'] / 1e3:.1f} kB | {s['upload_bytes_per_client'] / reference:.2f}x "
            f"| {s['round_seconds']:.1f} s |"
        )
    rows.append(f"| untrained model | {floor['macro_f1']:.3f} | {floor['accuracy']:.3f} | | | | |")
    return "\n".join(rows)


def plot(summaries: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """Macro-F1 (mean with one standard deviation) against upload size, one point per strategy; a personalised
    method at its federated macro-F1 (hollow), the only one that measures the models its clients use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8.5, 4.5))
    markers = itertools.cycle("osD^vP*Xph<>")
    for name, s in ranked(summaries):
        personalised = name in PERSONALISED
        metric = "federated_macro_f1" if personalised else "macro_f1"
        axes.errorbar(
            s["upload_bytes_per_client"] / 1e3,
            s[f"{metric}_mean"],
            yerr=s[f"{metric}_std"],
            fmt=next(markers),
            capsize=3,
            fillstyle="none" if personalised else "full",
            label=f"{name} (personalised)" if personalised else name,
        )
    axes.set_xlabel("upload per client per round (kB)")
    axes.set_ylabel("macro-F1 after the last round\n(central test set; personalised: each client's own)")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: points crowd
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)  # the plot is redrawn after every run


def main() -> None:
    """Run the comparison and write JSON, the table and the plot."""
    names = sorted(p.stem for p in (config.conf_dir() / "strategy").glob("*.yaml"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default=",".join(names), help="comma-separated conf/strategy names")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides, applied to every run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_strategies.json"))
    args = parser.parse_args()
    strategies, seeds = args.strategies.split(","), [int(s) for s in args.seeds.split(",")]
    overrides = [*SCALE, *args.extra]
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as root:
        for seed in seeds:  # seeds outermost: an interrupted run still has every strategy side by side
            for strategy in strategies:
                runs.setdefault(strategy, []).append({**run_one(strategy, seed, overrides, Path(root)), "seed": seed})
                write_report(runs, overrides, args.extra, args.out)  # a run cut short keeps what it finished


def write_report(runs: dict[str, list[dict[str, float]]], overrides: list[str], extra: list[str], out: Path) -> None:
    """Write the JSON (every run, the summary, the machine), the markdown table and the plot of ``runs``."""
    summaries = {name: summarise(results) for name, results in runs.items()}
    first = next(iter(runs.values()))
    floor = {m: statistics.mean(r[f"untrained_{m}"] for r in first) for m in ("macro_f1", "accuracy")}
    markdown = table(summaries, floor)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "overrides": overrides,
                "seeds": {name: [run["seed"] for run in results] for name, results in runs.items()},
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
                "summary": summaries,
                "untrained": floor,
                "runs": runs,
            },
            indent=2,
        )
    )
    out.with_suffix(".md").write_text(markdown + "\n")
    plot(summaries, out.with_suffix(".png"), " ".join(extra) or "4 hospitals, Dirichlet 0.5, ICD-10 chapters")
    print(markdown, flush=True)


if __name__ == "__main__":
    main()
