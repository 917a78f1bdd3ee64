"""Privacy mechanisms. Differential privacy mechanisms plug in here (see conf/privacy/)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NoPrivacy:
    """No differential privacy: updates are neither clipped nor noised, and no epsilon is claimed."""

    def describe(self) -> str:
        """One line for the model card."""
        return "none: no differential privacy guarantee is claimed for this adapter."
