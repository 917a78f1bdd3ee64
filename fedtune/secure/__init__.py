"""How client updates reach the aggregator (config group ``secure``): in the clear, or masked.

``secure=masking`` is fedtune.secure.masking.SecureAggregation; the modules here hold its protocol,
fixed-point code, primitives and identity keys, and at-rest encryption of outputs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plaintext:
    """Updates travel unencrypted (still signed): the server sees every client's individual adapter update."""

    masked = False

    def describe(self) -> str:
        """One line for the model card."""
        return "none (plaintext): the aggregating server could read each organisation's update."
