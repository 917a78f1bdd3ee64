"""A node's durable record of the rounds it has uploaded a masked update in: at most one per round.

Masking the same update twice in one round with the same seeds is a two-time pad: the difference of two
uploads for different survivor lists is a pairwise mask, and the server, which gets the self-mask seed in
the honest unmask step, recovers the update without any colluder. Uploading in the same round again in a
later run (a resume, or a rerun of the same experiment) is no safer: training is deterministic, so two
sums of that round over different client sets differ by one client's update. So a node uploads at most
once per round of an experiment, whatever the run, and writes that down (fsynced) before the upload
leaves the node.

A node also keeps its fixed group for contribution accounting (:class:`GroupRecord`).

The same holds for the SecAgg+ ring (fedtune/secure/masking.py): a node reveals its ring secret for one set
of clients per round of an experiment, whatever the run, and writes that set down before the secret leaves;
the secret itself is derived from the node's identity key, the experiment and the round, so a server that
starts the round again (another run, or after making the node forget the round) gets the same ring or none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.files import atomic_write
from fedtune.secure.session import ProtocolError


class _RoundFile:
    """One JSON object keyed by round number, on the node's own disk (inside its ``state-dir``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _rounds(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.is_file() else {}

    def _write(self, server_round: int, value: Any) -> None:
        self._write_key(str(server_round), value)

    def _write_key(self, key: str, value: Any) -> None:
        rounds = self._rounds()
        rounds[key] = value
        atomic_write(self.path, json.dumps(rounds, sort_keys=True).encode())  # fsynced


class RingRecord(_RoundFile):
    """The set of clients (U1) one node revealed its ring secret for, per round of one experiment.

    Args:
        path: The record's file.
    """

    def check(self, server_round: int, clients: list[str]) -> None:
        """Refuse ``clients`` for a round this node revealed its ring secret for another set in.

        Raises:
            ProtocolError: It did.
        """
        kept = self._rounds().get(str(server_round))
        if kept is not None and kept != sorted(clients):
            raise ProtocolError(
                f"This node already revealed its ring secret for round {server_round} of this experiment, for "
                f"another set of clients ({len(kept)}); another set would let the server choose the ring. Refused."
            )

    def record(self, server_round: int, clients: list[str]) -> None:
        """Write down, before the secret is sent, that this node reveals it for ``clients`` in ``server_round``."""
        self.check(server_round, clients)
        self._write(server_round, sorted(clients))


class GroupRecord(_RoundFile):
    """The fixed group one node masks within for contribution accounting, for one experiment (under the key
    "group"): the server draws the groups once a run (fedtune/contribution/groups.py), and regrouping later
    would reveal sums over other sets of clients.

    Args:
        path: The record's file.
    """

    def record(self, group: list[str]) -> None:
        """Write ``group`` down the first time; afterwards refuse any other.

        Raises:
            ProtocolError: Another group was written down for this experiment.
        """
        kept = self._rounds().get("group")
        if kept is None:
            self._write_key("group", sorted(group))
        elif kept != sorted(group):
            raise ProtocolError(
                f"This node masks within the group {kept} in this experiment; the server now puts it in "
                f"{sorted(group)}, which would reveal a sum over other clients. Refused."
            )


class UploadRecord(_RoundFile):
    """The rounds one node uploaded a masked update in, for one experiment.

    Args:
        path: The record's file.
    """

    def check(self, server_round: int) -> None:
        """Refuse a round this node already uploaded in.

        Raises:
            ProtocolError: It did; the message names the run it uploaded in.
        """
        run = self._rounds().get(str(server_round))
        if run is not None:
            raise ProtocolError(
                f"This node already uploaded a masked update for round {server_round} of this experiment (run {run}); "
                "a second one would let the server subtract two results and read this node's update. Refused."
            )

    def record(self, server_round: int, run_nonce: str) -> None:
        """Write down, before the upload is sent, that this node uploads in ``server_round`` (run ``run_nonce``)."""
        self.check(server_round)
        self._write(server_round, run_nonce)
