"""How client updates reach the aggregator. Secure aggregation schemes plug in here (see conf/secure/)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plaintext:
    """Updates travel unencrypted: the server sees every client's individual adapter update."""

    def describe(self) -> str:
        """One line for the model card."""
        return "none (plaintext): the aggregating server could read each organisation's update."
