"""The run directory: resolved config, metrics.jsonl, per-round checkpoints, and resume.

Layout::

    <run_dir>/config.yaml            resolved config of the run
    <run_dir>/metrics.jsonl          one JSON line per round per metric
    <run_dir>/partitions.json        clients' data sizes and label histograms
    <run_dir>/checkpoints/round-NNNN.pt
    <run_dir>/adapter/               final adapter in PEFT format
    <run_dir>/private/secrets.json   the server's DP noise and sampling secret (mode 0600; never share it)
    <run_dir>/README.md, metrics.png model card and plot
    <run_dir>/tensorboard/, mlflow/  an experiment tracker's record, if one was chosen (fedtune/trackers.py)
"""

from __future__ import annotations

import io
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedtune.adapters import AdapterState
from fedtune.files import atomic_write, create_private
from fedtune.seeding import NOISE_SECRET
from fedtune.trackers import NoTracker, Session


@dataclass(frozen=True)
class Checkpoint:
    """Server state after a completed round."""

    round: int
    adapter: AdapterState
    strategy_state: dict[str, Any]
    experiment_hash: str
    privacy_state: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)  # the round's ledger fields: a resume completes the round


class RunDir:
    """Reads and writes one run's outputs.

    Args:
        path: The run directory.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics_file = self.path / "metrics.jsonl"
        self._tracker: Session = NoTracker()

    def start(self, config_yaml: str, resume: bool) -> None:
        """Create the directory for a new run and save its resolved config, or check it for a resumed one
        (whose config.yaml stays as written: the ledger holds its hash, and checkpoints the experiment's).

        Raises:
            FileExistsError: A new run would overwrite an earlier run's checkpoints.
            FileNotFoundError: ``resume=true`` but there is nothing to resume.
        """
        self.check(resume)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write(self.path / "config.yaml", config_yaml.encode())

    def check(self, resume: bool) -> None:
        """Raise unless a new run (``resume=False``) or a resumed one can use this directory; writes nothing."""
        has_checkpoints = self.checkpoints.is_dir() and any(self.checkpoints.glob("round-*.pt"))
        if not has_checkpoints and self.checkpoints.is_dir() and any(self.checkpoints.glob("round-*.pt.enc")):
            raise FileExistsError(
                f"{self.checkpoints} holds encrypted checkpoints only; decrypt them first "
                f"(`fedtune decrypt {self.checkpoints} --key-file KEY`), or choose another run_dir."
            )
        if resume and not has_checkpoints:
            raise FileNotFoundError(
                f"resume=true but {self.checkpoints} holds no checkpoint; start without resume=true."
            )
        if not resume and has_checkpoints:
            raise FileExistsError(
                f"{self.path} already holds a run. Continue it with `resume=true run_dir={self.path}`, "
                "or choose another run_dir."
            )

    def track(self, tracker: Session) -> None:
        """Hand every metric line logged from now on to ``tracker`` too (an experiment tracker)."""
        self._tracker = tracker

    def log_metrics(self, server_round: int, scope: str, metrics: dict[str, float]) -> None:
        """Append one line per metric: ``{"round", "scope", "metric", "value"}``; the tracker gets them too."""
        with open(self.metrics_file, "a", encoding="utf-8") as handle:
            for name, value in metrics.items():
                handle.write(json.dumps({"round": server_round, "scope": scope, "metric": name, "value": value}) + "\n")
        self._tracker.log(server_round, scope, metrics)

    def read_metrics(self) -> list[dict[str, Any]]:
        """All metric lines written so far."""
        if not self.metrics_file.is_file():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]

    def save_checkpoint(self, checkpoint: Checkpoint) -> Path:
        """Write the checkpoint of a finished round atomically (a crash never leaves a half-written one)."""
        path = self.checkpoints / f"round-{checkpoint.round:04d}.pt"
        buffer = io.BytesIO()
        torch.save(
            {
                "round": checkpoint.round,
                "adapter": checkpoint.adapter,
                "strategy_state": checkpoint.strategy_state,
                "privacy_state": checkpoint.privacy_state,
                "experiment_hash": checkpoint.experiment_hash,
                "record": checkpoint.record,
            },
            buffer,
        )
        atomic_write(path, buffer.getvalue())
        return path

    def latest_checkpoint(self, experiment_hash: str, at_most: int | None = None) -> Checkpoint | None:
        """Load the newest checkpoint (of round ``at_most`` or earlier) and drop metric lines of later rounds.

        Returns None when no checkpoint qualifies: the run restarts at round 1 (metrics up to ``at_most`` kept).

        Raises:
            ValueError: The checkpoint was written by a different experiment config.
        """
        candidates = [p for p in self.checkpoint_paths() if at_most is None or int(p.stem[6:]) <= at_most]
        checkpoint = self.read_checkpoint(candidates[-1]) if candidates else None
        if checkpoint is not None and checkpoint.experiment_hash != experiment_hash:
            raise ValueError(
                f"{candidates[-1]} belongs to a different experiment config; resume with the same overrides as the "
                f"original run (see {self.path / 'config.yaml'})."
            )
        last = checkpoint.round if checkpoint is not None else at_most
        kept = [line for line in self.read_metrics() if last is None or line["round"] <= last]
        atomic_write(self.metrics_file, "".join(json.dumps(line) + "\n" for line in kept).encode())
        return checkpoint

    def checkpoint_paths(self) -> list[Path]:
        """The rounds' checkpoint files, oldest first."""
        return sorted(self.checkpoints.glob("round-*.pt"))

    @staticmethod
    def read_checkpoint(path: Path) -> Checkpoint:
        """One checkpoint file, as :meth:`save_checkpoint` wrote it (changes nothing)."""
        data = torch.load(path, weights_only=True)
        return Checkpoint(
            data["round"],
            data["adapter"],
            data["strategy_state"],
            data["experiment_hash"],
            data["privacy_state"],
            data.get("record", {}),
        )

    def drop_evaluation(self, server_round: int) -> None:
        """Remove ``server_round``'s evaluation lines (and its round time), to evaluate that round again."""
        kept = [
            line
            for line in self.read_metrics()
            if not (
                line["round"] == server_round
                and (line["scope"] in ("federated", "central") or line["metric"] == "round_seconds")
            )
        ]
        atomic_write(self.metrics_file, "".join(json.dumps(line) + "\n" for line in kept).encode())

    def secrets(self) -> dict[str, Any]:
        """The server's secrets for this run (DP noise and client sampling; fedtune/seeding.py), kept in
        ``<run_dir>/private/secrets.json`` (mode 0600) and read again on resume. They are never written into
        a checkpoint or metric, so those can be shared without letting anyone recompute the noise."""
        path = self.path / "private" / "secrets.json"
        if not path.is_file():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            create_private(path, json.dumps({NOISE_SECRET: secrets.token_hex(32)}).encode())
        return json.loads(path.read_text())

    def write_json(self, name: str, payload: Any) -> None:
        """Write ``payload`` as pretty JSON to ``<run_dir>/<name>``."""
        atomic_write(self.path / name, json.dumps(payload, indent=2).encode())
