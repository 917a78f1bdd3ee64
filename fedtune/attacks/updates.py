"""Attacks that replace a malicious client's trained update by another vector: each one needs only the
client's own update, so each also runs inside a masked sum (``secure=masking``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.adapters import AdapterState
from fedtune.attacks import Attack


@dataclass(frozen=True)
class SignFlip(Attack):
    """Send ``-scale`` times the trained update: pushes the global adapter against the honest direction
    (the standard sign-flipping attack of the Byzantine-robustness literature, e.g. Karimireddy et al. 2021).

    Args:
        scale: c > 0 in ``-c * update``.
    """

    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_positive("scale", self.scale)

    def corrupt(self, update: AdapterState, generator: torch.Generator) -> AdapterState:
        """``-scale * update``."""
        return {key: -self.scale * value for key, value in update.items()}


@dataclass(frozen=True)
class Scaling(Attack):
    """Send the trained update times ``factor``: model replacement (Bagdasaryan et al. 2020, "How To Backdoor
    Federated Learning", https://arxiv.org/abs/1807.00459) boosts by about n / server_lr so that its update
    outweighs the others in the mean.

    Args:
        factor: The boost (> 1 amplifies).
    """

    factor: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_positive("factor", self.factor)

    def corrupt(self, update: AdapterState, generator: torch.Generator) -> AdapterState:
        """``factor * update``."""
        return {key: self.factor * value for key, value in update.items()}


@dataclass(frozen=True)
class GaussianNoise(Attack):
    """Send Gaussian noise N(0, std²) in every coordinate instead of the update (the "Gaussian attack" of
    Blanchard et al. 2017, https://arxiv.org/abs/1703.02757).

    Args:
        std: Standard deviation of each coordinate.
    """

    std: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_positive("std", self.std)

    def corrupt(self, update: AdapterState, generator: torch.Generator) -> AdapterState:
        """Noise of the update's shapes and dtypes (tensors drawn in sorted-name order: reproducible)."""
        return {
            key: (self.std * torch.randn(update[key].shape, generator=generator, dtype=torch.float64)).to(
                update[key].dtype
            )
            for key in sorted(update)
        }


@dataclass(frozen=True)
class FreeRider(Attack):
    """Send a zero update: take the global model without contributing (the client may skip training; here it
    trains and discards, which changes nothing the server sees)."""

    def corrupt(self, update: AdapterState, generator: torch.Generator) -> AdapterState:
        """Zeros of the update's shapes."""
        return {key: torch.zeros_like(value) for key, value in update.items()}


def _require_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"attack.{key}={value}: must be positive.")
