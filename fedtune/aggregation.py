"""How a round's client updates become the one update a strategy is given: weighting and the weighted mean.

Both paths share this. In the clear (``secure=none``) the server sums weight x update itself; under
``secure=masking`` the same sum comes out of the protocol unmasked, and no individual update is ever
seen. Either way :meth:`Weighting.mean` turns the sum into the mean, so a linear strategy computes the
same thing on both paths, and what a client's weight is gets decided here only (the client computes the
weight it masks with the same :meth:`Weighting.weight`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fedtune.adapters import AdapterState

ClientWeighting = Literal["examples", "uniform"]


@dataclass(frozen=True)
class Weighting:
    """How clients count in a round's mean.

    Attributes:
        unit: Every client counts once, instead of by its number of training examples.
        fixed_denominator: Divide by a fixed round size (what the caller passes: the planned one under
            organisation-level DP), not by the sum of the weights that arrived. Organisation-level DP needs
            it: its noise is calibrated to the sensitivity of a mean over a fixed number of clients
            (McMahan et al. 2018).
    """

    unit: bool = False
    fixed_denominator: bool = False

    @classmethod
    def of(cls, declared: ClientWeighting) -> Weighting:
        """The weighting a strategy declares: ``examples`` (FedAvg's) or ``uniform``."""
        if declared not in ("examples", "uniform"):
            raise ValueError(f"strategy weighting {declared!r}: use 'examples' or 'uniform'.")
        return cls(unit=declared == "uniform")

    def weight(self, num_examples: float) -> int:
        """A client's weight in the sum (what it masks its update with under ``secure=masking``)."""
        return 1 if self.unit else int(num_examples)

    def mean(
        self, weighted_sum: AdapterState, total_weight: float, round_size: int, like: AdapterState
    ) -> AdapterState:
        """The round's mean update from the sum of weight x update, cast to the dtypes of ``like``."""
        divisor = round_size if self.fixed_denominator else total_weight
        if not divisor > 0:
            raise ValueError(f"a mean over a total weight of {divisor} is undefined.")
        return {key: (value / divisor).to(like[key].dtype) for key, value in weighted_sum.items()}


def weighted_sum(updates: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
    """Sum of weight x update, tensor by tensor, accumulated in float64 (what the masked sum decodes to)."""
    if not updates or len(updates) != len(weights):
        raise ValueError(f"one weight per update is needed, got {len(updates)} updates and {len(weights)} weights.")
    total = {key: torch.zeros_like(tensor, dtype=torch.float64) for key, tensor in updates[0].items()}
    for update, weight in zip(updates, weights, strict=True):
        for key, tensor in update.items():
            total[key] += tensor.to(torch.float64) * float(weight)
    return total


@dataclass(frozen=True)
class RoundUpdates:
    """What a strategy's ``aggregate`` is given for one round.

    Attributes:
        mean: The weighted mean of the contributors' updates (with organisation-level DP: clipped, over the
            round's fixed size, and noised), over the tensors the clients uploaded this round.
        contributors: How many clients' updates it combines.
        individual: Each contributor's update, in the clear; None under ``secure=masking``, where the server
            only ever sees their sum (so only linear strategies run there).
        weights: Each contributor's weight, beside ``individual``.
        base: The global adapter the updates were computed from (a client's trained adapter is
            ``base + update``).
    """

    mean: AdapterState
    contributors: int
    individual: tuple[AdapterState, ...] | None = None
    weights: tuple[float, ...] | None = None
    base: AdapterState | None = None

    def in_the_clear(self, method: str) -> tuple[tuple[AdapterState, ...], tuple[float, ...], AdapterState]:
        """Each update, its share of the total weight (the shares sum to 1) and the base, for a method that
        needs them (a non-linear strategy; the server refuses those under masking at start).

        Raises:
            ValueError: The individual updates, their weights or the base are missing.
        """
        if self.individual is None or self.weights is None or self.base is None:
            raise ValueError(f"{method} needs each client's update and the global adapter (plaintext rounds only).")
        total = sum(self.weights)
        return self.individual, tuple(w / total for w in self.weights), self.base
