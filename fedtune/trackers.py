"""Experiment trackers: TensorBoard or MLflow get every metric line of ``metrics.jsonl`` and the run's config.

``tracker=none`` (the default), ``tracker=tensorboard`` or ``tracker=mlflow``. The round engine opens the
tracker on the server only (nodes never log), once the run directory is ready, and
:meth:`fedtune.run_dir.RunDir.log_metrics` hands it each line it writes: metric ``<scope>/<metric>`` at step
``round``. The config (``<run_dir>/config.yaml``) goes in as hyperparameters and as text. Both write local
files unless told otherwise; their libraries are imported only when chosen (``pip install 'fedtune[trackers]'``).

A resumed run keeps its tracker record: TensorBoard's event file is written again from ``metrics.jsonl`` as
the resume left it (rounds after the checkpoint are gone from both); the same MLflow run goes on (its id
is in ``<run_dir>/mlflow_run.json``), and as MLflow's metric history only grows, a value logged before the
stop for a round that the resume does again is kept beside the new one at that step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import yaml

from fedtune.files import atomic_write

logger = logging.getLogger("fedtune")

_INSTALL = "pip install 'fedtune[trackers]'"
_MLFLOW_RUN = "mlflow_run.json"
_NOT_IN_A_NAME = re.compile(r"[^\w./: -]")  # MLflow refuses other characters (a node's name may have them)


class Session(Protocol):
    """An open tracker: receives the run's metric lines as they are written."""

    def log(self, server_round: int, scope: str, metrics: Mapping[str, float]) -> None:
        """Record ``metrics`` of ``scope`` at step ``server_round``."""

    def close(self, failed: bool) -> None:
        """End the record (``failed``: the run stopped on an error)."""


class NoTracker:
    """``tracker=none``: metrics.jsonl only."""

    def check(self) -> None:
        """Nothing is needed."""

    def open(self, run_dir: Path, history: list[dict[str, Any]], resumed: bool) -> NoTracker:
        """Nothing to open: this is its own session."""
        return self

    def log(self, server_round: int, scope: str, metrics: Mapping[str, float]) -> None:
        """Nothing to record."""

    def close(self, failed: bool) -> None:
        """Nothing to end."""


class TensorBoard:
    """``tracker=tensorboard``: an event file in ``<run_dir>/tensorboard/`` (``tensorboard --logdir runs``)."""

    def check(self) -> None:
        """Raise ValueError unless TensorBoard is installed."""
        _require("tensorboard", "tracker=tensorboard")

    def open(self, run_dir: Path, history: list[dict[str, Any]], resumed: bool) -> Session:
        """Start the event file with the config and the metric lines so far (``history``), replacing any
        earlier event file of the run: the record always holds what metrics.jsonl holds."""
        self.check()
        from torch.utils.tensorboard import SummaryWriter  # lazily: only a run that chose TensorBoard needs it
        from torch.utils.tensorboard.summary import hparams

        log_dir = run_dir / "tensorboard"
        for earlier in log_dir.glob("events.out.tfevents.*"):
            earlier.unlink()
        writer = SummaryWriter(str(log_dir))
        config_yaml = (run_dir / "config.yaml").read_text(encoding="utf-8")
        writer.add_text("config", "".join(f"    {line}\n" for line in config_yaml.splitlines()))  # Markdown code
        values = {
            key: v if isinstance(v, int | float | str) else json.dumps(v) for key, v in _flat(config_yaml).items()
        }
        # The session's hyperparameters alone: the HParams dashboard infers the columns from every run's own.
        writer.file_writer.add_summary(hparams(values, {})[1])
        session = _TensorBoardSession(writer)
        for line in history:
            session.log(line["round"], line["scope"], {line["metric"]: line["value"]})
        return session


class _TensorBoardSession:
    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log(self, server_round: int, scope: str, metrics: Mapping[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(_key(scope, name), float(value), server_round)
        self.writer.flush()  # readable while the run goes on, and complete if the server stops

    def close(self, failed: bool) -> None:
        self.writer.close()


class MLflow:
    """``tracker=mlflow``: one MLflow run per fedtune run, in a local SQLite store unless told otherwise.

    Args:
        tracking_uri: Where MLflow keeps its runs. Unset: ``<run_dir>/mlflow/mlflow.db``. A local path of
            a SQLite file (or ``sqlite:///PATH``): several runs in one store, to compare them in one
            ``mlflow ui``. ``http(s)://HOST``: an MLflow tracking server, which then receives the run's
            metrics and config over the network.
        experiment: The MLflow experiment the runs are filed under.

    Raises:
        ValueError: ``tracking_uri`` is neither a local SQLite file nor an http(s) server, or no experiment.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "fedtune") -> None:
        if tracking_uri is not None and urlparse(tracking_uri).scheme not in ("", "sqlite", "http", "https"):
            raise ValueError(
                f"tracker.tracking_uri={tracking_uri!r}: give a local SQLite file (a path, or sqlite:///PATH) or "
                "an MLflow server (http(s)://HOST); leave it unset for <run_dir>/mlflow/mlflow.db."
            )
        if not experiment:
            raise ValueError(
                "tracker.experiment is empty; name the MLflow experiment, e.g. tracker.experiment=fedtune."
            )
        self.tracking_uri, self.experiment = tracking_uri, experiment

    def check(self) -> None:
        """Raise ValueError unless MLflow is installed."""
        _require("mlflow", "tracker=mlflow")

    def open(self, run_dir: Path, history: list[dict[str, Any]], resumed: bool) -> Session:
        """Continue the run's MLflow run when resumed (if its store still holds it), else start one with the
        config and the metric lines so far (``history``)."""
        self.check()
        # MLflow 3 reports usage to its makers unless told not to, when it is imported: never from here.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow import MlflowClient  # lazily: only a run that chose MLflow needs it
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException

        uri, artifacts = self._store(run_dir)
        if artifacts is None:
            logger.warning("tracker=mlflow: the run's metrics and config are sent to %s", uri)
        client = MlflowClient(tracking_uri=uri)
        known = run_dir / _MLFLOW_RUN
        earlier = json.loads(known.read_text()) if resumed and known.is_file() else {}
        if earlier.get("tracking_uri") == uri:
            try:
                client.update_run(earlier["run_id"], status="RUNNING")
                return _MLflowSession(client, earlier["run_id"])
            except MlflowException:
                logger.warning("MLflow run %s is not in %s: a new one starts", earlier["run_id"], uri)
        found = client.get_experiment_by_name(self.experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(self.experiment, artifacts)
        run_id = client.create_run(
            experiment_id, run_name=str(run_dir), tags={"fedtune.run_dir": str(run_dir.resolve())}
        ).info.run_id
        atomic_write(known, json.dumps({"tracking_uri": uri, "run_id": run_id}).encode())
        config_yaml = (run_dir / "config.yaml").read_text(encoding="utf-8")
        params = [
            Param(_NOT_IN_A_NAME.sub("_", key), v if isinstance(v, str) else json.dumps(v))
            for key, v in _flat(config_yaml).items()
        ]
        now = int(time.time() * 1000)
        metrics = [Metric(_key(m["scope"], m["metric"]), float(m["value"]), now, m["round"]) for m in history]
        for start in range(0, len(params), 100):  # MLflow's limits per call: 100 parameters, 1000 metrics
            client.log_batch(run_id, params=params[start : start + 100])
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start : start + 1000])
        client.log_text(run_id, config_yaml, "config.yaml")
        return _MLflowSession(client, run_id)

    def _store(self, run_dir: Path) -> tuple[str, str | None]:
        """The tracking URI, and where a new experiment keeps its artifacts (None: a server decides)."""
        uri = self.tracking_uri
        if uri is not None and urlparse(uri).scheme in ("http", "https"):
            return uri, None
        if uri is None:
            database = run_dir / "mlflow" / "mlflow.db"
        else:
            database = Path(uri.removeprefix("sqlite:///") if uri.startswith("sqlite:") else uri)
        database = database.resolve()
        database.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{database}", str(database.parent / f"{database.stem}-artifacts")


class _MLflowSession:
    def __init__(self, client: Any, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def log(self, server_round: int, scope: str, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        lines = [Metric(_key(scope, name), float(value), now, server_round) for name, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=lines)

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _require(module: str, choice: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{choice} needs the {module} package, which is not installed: {_INSTALL}")


def _key(scope: str, metric: str) -> str:
    """The tracker's name of a metric line: ``central/accuracy``, ``client:hospital-0/update_norm``."""
    return _NOT_IN_A_NAME.sub("_", f"{scope}/{metric}")


def _flat(config_yaml: str) -> dict[str, Any]:
    """The config's values by dotted key (``lora.r``); lists are values."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = node

    walk(yaml.safe_load(config_yaml), "")
    return flat
