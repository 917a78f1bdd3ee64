"""A tamper-evident record of a run: one hash-chained entry per round, checked by ``fedtune audit``.

``<run_dir>/ledger.jsonl`` starts with the config and initial adapter, then one entry per round
(participants, a hash of what each sent, the aggregated adapter, the checkpoint, privacy spent, that
round's metric lines), then the exported adapter files. Each entry holds the hash of the one before, so
editing, removing or reordering any entry, metric line, checkpoint or adapter file breaks the chain
at a point :func:`audit` names. Whoever publishes the last entry's hash (printed at the end of a run)
also fixes the length of the run: ``fedtune audit RUN_DIR --head HASH`` then detects a cut-off tail.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

LEDGER = "ledger.jsonl"
GENESIS = "0" * 64


class Ledger:
    """Appends to and reads ``<run_dir>/ledger.jsonl``.

    Args:
        run_dir: The run directory.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEDGER

    def entries(self) -> list[dict[str, Any]]:
        """All entries, oldest first."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def append(self, kind: str, server_round: int, **fields: Any) -> dict[str, Any]:
        """Add an entry chained to the last one; returns it with its hash."""
        entries = self.entries()
        entry = {"kind": kind, "round": server_round, **fields, "prev": entries[-1]["hash"] if entries else GENESIS}
        entry["hash"] = entry_hash(entry)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, sort_keys=True) + "\n")
        return entry

    def last_round(self) -> int:
        """The last round with an entry (-1 if none)."""
        rounds = [e["round"] for e in self.entries() if e["kind"] in ("start", "round")]
        return max(rounds, default=-1)

    def truncate(self, last_round: int) -> None:
        """Drop entries after ``last_round`` (a resumed run redoes those rounds)."""
        kept = [e for e in self.entries() if e["kind"] in ("start", "round") and e["round"] <= last_round]
        self.path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in kept), encoding="utf-8")


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of the entry's canonical JSON, without its own hash."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_hash(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def metrics_hash(metrics_file: Path, server_round: int) -> str:
    """SHA-256 of the metric lines of one round, exactly as written."""
    lines = metrics_file.read_text(encoding="utf-8").splitlines() if metrics_file.is_file() else []
    chosen = [line for line in lines if line.strip() and json.loads(line)["round"] == server_round]
    return hashlib.sha256("\n".join(chosen).encode()).hexdigest()


def audit(run_dir: str | Path, head: str | None = None) -> list[str]:
    """Check the ledger of ``run_dir`` against itself and the run's files; returns the problems found.

    The first problem names the first broken entry; an empty list means the run is intact.
    """
    run_dir = Path(run_dir)
    entries = Ledger(run_dir).entries()
    if not entries:
        return [f"{run_dir / LEDGER} is missing or empty"]
    previous, expected_round, aggregate = GENESIS, 0, None
    for index, entry in enumerate(entries):
        where = f"entry {index} ({entry.get('kind')} round {entry.get('round')})"
        if entry.get("prev") != previous:
            return [f"{where}: does not follow the entry before it (an entry was removed, reordered or edited)"]
        if entry_hash(entry) != entry.get("hash"):
            return [f"{where}: its content does not match its hash (the entry was edited)"]
        if entry["kind"] in ("start", "round"):
            if entry["round"] != expected_round:
                return [f"{where}: expected round {expected_round} (a round is missing)"]
            expected_round += 1
        problem = _check_files(run_dir, entry)
        if entry["kind"] == "export" and entry["adapter"] != aggregate:
            problem = "the exported adapter is not the aggregate of the last round"
        aggregate = entry.get("aggregate", aggregate)
        if problem:
            return [f"{where}: {problem}"]
        previous = entry["hash"]
    if head is not None and previous != head:
        return [f"the ledger ends at {previous[:16]}…, not at the published head {head[:16]}… (entries were cut off)"]
    return []


def _check_files(run_dir: Path, entry: dict[str, Any]) -> str | None:
    if (
        entry["kind"] in ("start", "round")
        and metrics_hash(run_dir / "metrics.jsonl", entry["round"]) != entry["metrics"]
    ):
        return f"the metric lines of round {entry['round']} in metrics.jsonl were changed"
    if entry["kind"] == "start" and file_hash(run_dir / "config.yaml") != entry["config_file"]:
        return "config.yaml was changed"
    if entry["kind"] == "round":
        checkpoint = run_dir / entry["checkpoint_file"]
        if not checkpoint.is_file():
            return (
                f"{entry['checkpoint_file']} is missing (if it is encrypted at rest, decrypt it to audit the run: "
                f"`fedtune decrypt {run_dir / 'checkpoints'} --key-file KEY`)"
            )
        if file_hash(checkpoint) != entry["checkpoint"]:
            return f"{entry['checkpoint_file']} was changed"
    if entry["kind"] == "export":
        for name, digest in entry["files"].items():
            path = run_dir / name
            if not path.is_file() or file_hash(path) != digest:
                return f"{name} is missing or was changed"
    return None
