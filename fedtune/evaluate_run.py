"""``fedtune evaluate``: a run's final adapter on a site's own held-out file, on the site's own machine.

A hospital checks the shared model on its own data before adopting it. The run's saved config says what
was trained (base model, LoRA, task, label names); only where the data is (``data=...``, ``data.*``) and where
this machine keeps the base model (``model.path=...``) may change. The adapter is loaded, and refused on other
base weights, by fedtune/finished_run.py. Nothing is written to the run directory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedtune import config
from fedtune.errors import DataError, UnknownLabels
from fedtune.evaluation import majority_baseline
from fedtune.experiment import get_experiment
from fedtune.finished_run import FinishedRun, load_run
from fedtune.report import final_central
from fedtune.run_dir import RunDir


@dataclass(frozen=True)
class Evaluation:
    """The final adapter's metrics on the data evaluated, beside what the run itself measured.

    Attributes:
        server_round: The round whose adapter was evaluated (the run's last checkpoint).
        rows: How many rows were evaluated.
        source: What was evaluated: the site's file, or the run's own central test set.
        metrics: The task's metrics (classification: loss, accuracy, macro-F1; causal LM: loss, perplexity,
            exact match; plain text: loss, perplexity).
        majority: Classification only: always predicting the evaluated data's most common label.
        run_central: The run's own central test metrics of its final round (metrics.jsonl).
    """

    server_round: int
    rows: int
    source: str
    metrics: dict[str, float]
    majority: dict[str, float] | None
    run_central: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def evaluate_run(run_dir: Path, overrides: Sequence[str]) -> Evaluation:
    """Evaluate the last checkpoint of ``run_dir`` on the data ``overrides`` name (default: the run's central
    test set, which reproduces the run's own final central metrics).

    Raises:
        ConfigError: An override changes anything but the data or the base model's path; the run has no
            checkpoint; or the base model here is not the one the adapter was trained on.
        DataError: The file cannot be read, or holds labels the run did not train on.
    """
    data_overrides, model_path = _split(overrides)
    finished = load_run(run_dir, model_path)
    run, checkpoint = finished.experiment, finished.checkpoint
    if not data_overrides:
        evaluated, source = run, "the run's central test set"
        dataset = run.test_set
    else:
        evaluated = get_experiment(_with_data(finished, data_overrides))
        try:
            dataset = evaluated.corpus.dataset
        except UnknownLabels as error:
            raise DataError(
                f"labels {error.unknown[:5]} in column {error.column!r} of {error.file} are not among the "
                f"{len(error.names)} classes the run trained on ({error.names[:5]}"
                f"{' ...' if len(error.names) > 5 else ''}): write them as the run's class names."
            ) from error
        source = str(evaluated.cfg.data.loader.get("path", "the data named"))
    dataset = dataset.select(range(min(len(dataset), evaluated.train_config.eval_max_examples or len(dataset))))
    metrics = evaluated.evaluate(checkpoint.adapter, dataset)
    majority = None
    if evaluated.corpus.task == "classification":
        majority = majority_baseline(dataset["label"], dataset["label"])
    run_central = final_central(RunDir(run_dir).read_metrics())
    return Evaluation(checkpoint.round, len(dataset), source, metrics, majority, run_central)


def format_evaluation(run_dir: Path, result: Evaluation) -> str:
    """The evaluation as the lines ``fedtune evaluate`` prints."""

    def line(metrics: dict[str, float]) -> str:
        return " ".join(f"{name} {value:.4f}" for name, value in metrics.items())

    lines = [
        f"Final adapter of {run_dir} (round {result.server_round}) on {result.source} ({result.rows} rows):",
        f"  {line(result.metrics)}",
    ]
    if result.majority is not None:
        lines.append(f"  always its most common label: {line(result.majority)}")
    if result.run_central:
        lines.append(f"  the run's own central test set, final round: {line(result.run_central)}")
    return "\n".join(lines)


def _split(overrides: Sequence[str]) -> tuple[list[str], str | None]:
    data, model_path = [], None
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "data" or key.startswith("data."):
            data.append(override)
        elif key == "model.path":
            model_path = value
        else:
            raise config.ConfigError(
                f"fedtune evaluate changes only the data (data=..., data.*) and where this machine keeps the base "
                f"model (model.path=...), not {key!r}: the rest is what the run trained."
            )
    return data, model_path


def _with_data(finished: FinishedRun, data_overrides: list[str]) -> DictConfig:
    """The run's config with the data section of ``data_overrides``, every row evaluated, the run's task, and
    (for a classifier) the run's label names, so that the file's labels get the ids the adapter was trained
    with (string and Parquet class labels by name; integer labels are taken as the run's ids)."""
    trained = finished.cfg
    data = config.compose([*data_overrides, *_loader_task(data_overrides, str(trained.model.task))]).data
    cfg = OmegaConf.merge(OmegaConf.to_container(trained), {"train": {"eval_max_examples": 0}})  # 0: all rows
    cfg.data = OmegaConf.to_container(data)
    names = finished.label_names
    loader = cfg.data.loader
    if names is not None and "label_names" in loader:
        if loader.label_names is not None and list(loader.label_names) != list(names):
            raise config.ConfigError(
                "data.loader.label_names must be the run's class names, in the run's order (leave it unset: "
                "fedtune evaluate sets it)."
            )
        loader.label_names = list(names)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _loader_task(data_overrides: list[str], task: str) -> list[str]:
    """``data.loader.task=<the run's task>`` for a local file, unless the overrides set it."""
    local = any(o.partition("=")[0] == "data" and o.partition("=")[2] == "local" for o in data_overrides)
    given = any(o.startswith("data.loader.task=") for o in data_overrides)
    return [f"data.loader.task={task}"] if local and not given else []
