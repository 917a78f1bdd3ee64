"""``fedtune compare``: the final metrics of several runs side by side, seeds folded into mean and spread.

Runs are compared by their saved configs: the keys whose values differ between runs name the columns, and
runs that differ only in ``seed`` form one group, reported as the mean and the sample standard deviation over
its seeds (a single-seed group has no spread). The metric curves of every run go into one plot.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fedtune.config import ConfigError
from fedtune.report import final_central
from fedtune.run_dir import RunDir

_IGNORED = ("run_dir", "resume", "tracker")  # bookkeeping: never a difference between experiments
SEED = "seed"


@dataclass(frozen=True)
class Run:
    """One run directory: its flattened config, its final central metrics and their curves."""

    path: Path
    settings: dict[str, str]
    final: dict[str, float]
    curves: dict[str, list[tuple[int, float]]]


@dataclass(frozen=True)
class Group:
    """Runs that differ only in their seed.

    Attributes:
        settings: The differing keys' values this group has (the seed excluded).
        runs: The group's runs.
        mean: Per metric, the mean over the runs.
        std: Per metric, the sample standard deviation over the runs (None for one run).
    """

    settings: dict[str, str]
    runs: list[Run]
    mean: dict[str, float]
    std: dict[str, float | None]


def find_runs(paths: Sequence[Path]) -> list[Run]:
    """Every run directory named, or directly inside a directory named (a multirun sweep).

    Raises:
        ConfigError: A path holds no run, or a run has no metrics yet.
    """
    runs = []
    for path in paths:
        found = [path] if (path / "config.yaml").is_file() else sorted(p.parent for p in path.glob("*/config.yaml"))
        if not found:
            raise ConfigError(f"{path} is neither a run directory (config.yaml) nor a folder of them.")
        runs.extend(_load(run) for run in found)
    return runs


def compare(runs: list[Run]) -> tuple[list[str], list[Group]]:
    """The keys that differ between ``runs`` (seed last) and the runs grouped by all of them but the seed."""
    keys = sorted({k for run in runs for k in run.settings if k.split(".")[0] not in _IGNORED})
    differing = [k for k in keys if len({run.settings.get(k) for run in runs}) > 1]
    by_setting: dict[tuple[str | None, ...], list[Run]] = {}
    for run in runs:
        by_setting.setdefault(tuple(run.settings.get(k) for k in differing if k != SEED), []).append(run)
    groups = []
    for members in by_setting.values():
        metrics = sorted(set.intersection(*(set(run.final) for run in members)))
        values = {m: [run.final[m] for run in members] for m in metrics}
        groups.append(
            Group(
                {k: str(members[0].settings.get(k)) for k in differing if k != SEED},
                members,
                {m: statistics.mean(v) for m, v in values.items()},
                {m: statistics.stdev(v) if len(v) > 1 else None for m, v in values.items()},
            )
        )
    return [k for k in differing if k != SEED] + ([SEED] if SEED in differing else []), groups


def table(keys: list[str], groups: list[Group]) -> list[dict[str, Any]]:
    """One row per group: its settings, how many seeds, and each metric's mean and spread."""
    rows = []
    for group in groups:
        row: dict[str, Any] = {k: group.settings.get(k, "") for k in keys if k != SEED}
        row["seeds"] = len(group.runs)
        for metric, mean in group.mean.items():
            row[f"{metric}_mean"] = mean
            row[f"{metric}_std"] = group.std[metric]
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table; a metric's mean and spread share one cell (``0.8123 ± 0.0040``)."""
    if not rows:
        return ""
    settings = [k for k in rows[0] if not k.endswith(("_mean", "_std"))]
    metrics = [k.removesuffix("_mean") for k in rows[0] if k.endswith("_mean")]
    lines = ["| " + " | ".join(settings + metrics) + " |", "|" + "---|" * (len(settings) + len(metrics))]
    for row in rows:
        cells = [str(row[k]) for k in settings]
        for metric in metrics:
            spread = row.get(f"{metric}_std")
            cells.append(f"{row[f'{metric}_mean']:.4f}" + (f" ± {spread:.4f}" if spread is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV (an empty spread is an empty cell)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def plot(runs: list[Run], keys: list[str], target: Path) -> None:
    """Every run's central metric curves in one figure (one panel per metric), labelled by its settings."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = sorted({m for run in runs for m in run.curves})
    figure, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        for run in runs:
            points = run.curves.get(metric, [])
            label = " ".join(f"{k}={run.settings.get(k)}" for k in keys) or run.path.name
            axis.plot([r for r, _ in points], [v for _, v in points], marker=".", label=label)
        axis.set_title(f"central {metric}")
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(target, dpi=120)
    plt.close(figure)


def _load(path: Path) -> Run:
    metrics = RunDir(path).read_metrics()
    final = final_central(metrics)
    if not final:
        raise ConfigError(f"{path} has no central metrics yet: no round has been evaluated.")
    curves: dict[str, list[tuple[int, float]]] = {}
    for line in sorted(metrics, key=lambda m: m["round"]):
        if line["scope"] == "central":
            curves.setdefault(line["metric"], []).append((line["round"], line["value"]))
    settings = _flatten(OmegaConf.to_container(OmegaConf.load(path / "config.yaml")))
    return Run(path, settings, final, curves)


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        flat: dict[str, str] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.removesuffix("."): json.dumps(node) if isinstance(node, list) else str(node)}
