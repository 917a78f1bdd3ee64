"""A tamper-evident record of a run: one hash-chained entry per round, checked by ``fedtune audit``.

``<run_dir>/ledger.jsonl`` starts with the config and initial adapter, then one entry per round
(participants, a hash of what each sent, the aggregated adapter, the checkpoint, privacy spent, that
round's metric lines), then the exported adapter files. Each entry holds the hash of the one before, so
editing, removing or reordering any entry, metric line, checkpoint or adapter file breaks the chain
at a point :func:`audit` names. Whoever publishes the last entry's hash (printed at the end of a run)
also fixes the length of the run: ``fedtune audit RUN_DIR --head HASH`` then detects a cut-off tail.

With contribution accounting, every number the entries hold about who contributed what is recomputed from
the entries themselves (fedtune/contribution/audit.py).

Every entry is signed with the server's Ed25519 identity key (named in the first entry), and each round's
entry keeps every contributing client's own reply signature with its public key, bound to the run nonce,
round and step: a third party checks who contributed without trusting the server's files
(``fedtune audit RUN_DIR --server-key HEX`` pins the server key it trusts).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fedtune.secure import identity
from fedtune.secure.identity import Identity
from fedtune.secure.session import Session

LEDGER = "ledger.jsonl"
GENESIS = "0" * 64


class Ledger:
    """Appends to and reads ``<run_dir>/ledger.jsonl``.

    Args:
        run_dir: The run directory.
        signer: The server's identity key, which signs every entry it appends (None: read only).
    """

    def __init__(self, run_dir: str | Path, signer: Identity | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LEDGER
        self.signer = signer

    def entries(self) -> list[dict[str, Any]]:
        """All entries, oldest first."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def append(self, kind: str, server_round: int, **fields: Any) -> dict[str, Any]:
        """Add an entry chained to the last one; returns it with its hash."""
        entries = self.entries()
        if self.signer is None:
            raise ValueError("This ledger was opened without the server's identity key; it cannot sign entries.")
        entry = {"kind": kind, "round": server_round, **fields, "prev": entries[-1]["hash"] if entries else GENESIS}
        if not entries:
            entry["server_key"] = self.signer.public_hex
        entry["hash"] = entry_hash(entry)
        entry["signature"] = self.signer.sign(bytes.fromhex(entry["hash"])).hex()
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
    """SHA-256 of the entry's canonical JSON, without its own hash and signature."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
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


def audit(run_dir: str | Path, head: str | None = None, server_key: str | None = None) -> list[str]:
    """Check the ledger of ``run_dir`` against itself and the run's files; returns the problems found.

    ``server_key`` (hex) is the server identity key the auditor trusts; without it, the key the ledger
    names is used (which then proves only that one key signed the whole ledger). The first problem names
    the first broken entry; an empty list means the run is intact.
    """
    run_dir = Path(run_dir)
    entries = Ledger(run_dir).entries()
    if not entries:
        return [f"{run_dir / LEDGER} is missing or empty"]
    signer = entries[0].get("server_key")
    if not isinstance(signer, str):
        return ["entry 0: the ledger names no server key, so its entries cannot be checked as the server's"]
    if server_key is not None and server_key != signer:
        return [f"the ledger is signed by server key {signer[:16]}…, not by the trusted key {server_key[:16]}…"]
    previous, expected_round, aggregate = GENESIS, 0, None
    for index, entry in enumerate(entries):
        where = f"entry {index} ({entry.get('kind')} round {entry.get('round')})"
        if entry.get("prev") != previous:
            return [f"{where}: does not follow the entry before it (an entry was removed, reordered or edited)"]
        if entry_hash(entry) != entry.get("hash"):
            return [f"{where}: its content does not match its hash (the entry was edited)"]
        if not _signed_by(signer, entry):
            return [f"{where}: its signature does not verify under the server key (forged, or re-hashed after an edit)"]
        unsigned = _unsigned_replies(entry)
        if unsigned:
            return [f"{where}: the reply of {unsigned} does not carry that client's valid signature"]
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
    if any("contribution" in entry for entry in entries):
        from fedtune.contribution import audit as contribution_audit  # deferred: builds the config's components

        problem = contribution_audit.check(run_dir, entries, _metric_lines(run_dir))
        if problem:
            return [problem]
    if head is not None and previous != head:
        return [f"the ledger ends at {previous[:16]}…, not at the published head {head[:16]}… (entries were cut off)"]
    return []


def _metric_lines(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def _signed_by(public_hex: str, entry: dict[str, Any]) -> bool:
    signature = entry.get("signature")
    try:
        return isinstance(signature, str) and identity.verify(
            public_hex, bytes.fromhex(signature), bytes.fromhex(entry["hash"])
        )
    except ValueError:
        return False


def _unsigned_replies(entry: dict[str, Any]) -> list[str]:
    """The contributors of a round entry whose recorded reply signature does not verify."""
    if entry["kind"] != "round":
        return []
    session = Session(str(entry.get("run_nonce")), int(entry["round"]))
    bad = []
    for client, reply in sorted(entry.get("received", {}).items()):
        try:
            payload = session.reply_signed_bytes("train", client, reply["digest"])
            valid = identity.verify(reply["key"], bytes.fromhex(reply["signature"]), payload)
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            bad.append(client)
    if sorted(entry.get("received", {})) != sorted(entry.get("participants", [])):
        bad.append("a participant without a recorded reply")
    return bad


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
