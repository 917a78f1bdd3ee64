"""What a node states about its round for contribution accounting, signed with its identity key.

The report travels in the node's train reply (whose own signature covers everything in it), and carries a
signature of its own over just the report, bound to the run, the round and the node: the ledger keeps
report and signature, so an auditor checks what each node claimed without the reply's update.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from fedtune.secure import identity
from fedtune.secure.identity import Identity
from fedtune.secure.session import Session

if TYPE_CHECKING:
    from fedtune.experiment import Experiment

# Record and key names in a train reply (fedtune/wire.py's convention).
RECORD, REPORT, SIGNATURE = "contribution", "report", "signature"


@dataclass(frozen=True)
class Report:
    """A node's statement about one round's training.

    Attributes:
        examples: Training examples it used: exact in the clear, rounded down to a multiple of ``bucket``
            under ``secure=masking`` (the exact count stays masked), None under organisation-level DP (each
            participation counts once, and the count would say more than the DP claim allows).
        bucket: Width of the examples' bucket: the count lies in ``examples .. examples + bucket - 1``.
        steps: Local optimiser steps it ran.
        batch_size: Examples per step (the expected size under Poisson sampling).
    """

    examples: int | None
    bucket: int
    steps: int
    batch_size: int

    @classmethod
    def of_round(cls, num_examples: int, bucket: int, counted: bool, steps: int, batch_size: int) -> Report:
        """The report of a round that trained on ``num_examples`` (``counted``: report them at all)."""
        return cls((num_examples // bucket) * bucket if counted else None, bucket, steps, batch_size)

    @property
    def compute(self) -> int:
        """Examples processed: steps x batch size."""
        return self.steps * self.batch_size

    @property
    def midpoint(self) -> float:
        """The middle of the examples' bucket (the count itself when the bucket is 1)."""
        return 0.0 if self.examples is None else self.examples + (self.bucket - 1) / 2

    def to_json(self) -> str:
        """Canonical wire and ledger form."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Report:
        """Parse :meth:`to_json`, refusing anything else.

        Raises:
            ValueError: Not a report: other fields, or values of the wrong type or sign.
        """
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) != {"examples", "bucket", "steps", "batch_size"}:
            raise ValueError("a contribution report has exactly examples, bucket, steps and batch_size.")
        counts = [data["bucket"], data["steps"], data["batch_size"]]
        if data["examples"] is not None:
            counts.append(data["examples"])
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in counts) or data["bucket"] < 1:
            raise ValueError("a contribution report's counts are non-negative integers and its bucket at least 1.")
        return cls(**data)


def for_round(experiment: Experiment, num_examples: int) -> Report:
    """What a node of ``experiment`` reports for a round it trained on ``num_examples`` rows: the count exact in
    the clear, bucketed (``contribution.data_bucket``) under masking, left out under organisation-level DP."""
    bucket = experiment.contribution.data_bucket if experiment.secure.masked else 1
    counted = experiment.privacy.organisation is None
    train = experiment.train_config
    return Report.of_round(num_examples, bucket, counted, train.local_steps, train.batch_size)


def signed_bytes(session: Session, client: str, report_json: str) -> bytes:
    """What a node signs for its report."""
    return session.context("contribution-report", client, report_json)


def sign(report: Report, signer: Identity, session: Session, client: str) -> tuple[str, bytes]:
    """The report's wire form and the node's signature over it."""
    text = report.to_json()
    return text, signer.sign(signed_bytes(session, client, text))


def verify(report_json: str, signature: bytes, public_hex: str, session: Session, client: str) -> Report:
    """The report, once its signature checks out under ``public_hex`` for this run, round and client.

    Raises:
        ValueError: A bad signature or a malformed report.
    """
    if not identity.verify(public_hex, signature, signed_bytes(session, client, report_json)):
        raise ValueError(f"the contribution report of {client} is not signed by its identity key for this round")
    return Report.from_json(report_json)
