"""The shared part of the robust aggregation rules: each update in the clear, as one row of a matrix.

A robust rule replaces the mean by a statistic that a minority of bad updates cannot drag far (median,
trimmed mean, Krum...). It needs every client's update, so it is not linear: the server refuses it under
``secure=masking`` and organisation-level DP at start (fedtune/experiment.py). Clients count equally (a
malicious client could claim any number of examples), and each rule declares the smallest round its
guarantee holds for (``min_clients``), which the server checks against ``federation.min_train_clients``.
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune import adapters
from fedtune.adapters import AdapterState
from fedtune.aggregation import ClientWeighting, RoundUpdates
from fedtune.client_settings import ClientSettings


class RobustRule:
    """A plaintext-only rule over the round's updates, stepped like FedAvg (``global + server_lr * rule``).

    Subclasses define :meth:`combine` (rows in, one row out) and ``min_clients``.

    Args:
        server_lr: Scale of the combined update applied to the global adapter.
    """

    linear = False
    weighting: ClientWeighting = "uniform"
    folds_residuals = False

    def __init__(self, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise ValueError(f"strategy.server_lr={server_lr}: must be positive (1.0 applies the rule's update).")
        self.server_lr = server_lr

    @property
    def min_clients(self) -> int:
        """The fewest updates a round may combine for the rule's guarantee to hold."""
        raise NotImplementedError

    def combine(self, rows: torch.Tensor, layout: str) -> torch.Tensor:
        """One update (a vector) from the round's updates, one per row (float64); ``layout`` names the tensors
        the columns come from (a rule that remembers past rounds keys its memory on it)."""
        raise NotImplementedError

    def configure(self, server_round: int, client: str) -> ClientSettings:
        """Every client trains and uploads the whole adapter."""
        return ClientSettings()

    def aggregate(self, updates: RoundUpdates, server_round: int) -> AdapterState:
        """The rule applied to the round's individual updates.

        Raises:
            ValueError: Fewer updates than ``min_clients`` (the server refuses such settings at start), or none
                in the clear.
        """
        individual, _, _ = updates.in_the_clear(type(self).__name__)
        if len(individual) < self.min_clients:
            raise ValueError(f"{type(self).__name__} needs at least {self.min_clients} updates, got {len(individual)}.")
        keys, rows = adapters.as_rows(individual)
        combined, start = self.combine(rows, ",".join(keys)), 0
        result = {}
        for key in keys:
            like = individual[0][key]
            result[key] = combined[start : start + like.numel()].reshape(like.shape).to(like.dtype)
            start += like.numel()
        return result

    def step(self, global_adapter: AdapterState, aggregate: AdapterState, server_round: int) -> AdapterState:
        """``global + server_lr * aggregate``."""
        return adapters.apply(global_adapter, {key: self.server_lr * value for key, value in aggregate.items()})

    def state_dict(self) -> dict[str, Any]:
        """No state across rounds (centered clipping overrides this)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


class ByzantineRule(RobustRule):
    """A rule whose guarantee is for a declared number of arbitrary updates a round (median, Krum...).

    Args:
        byzantine: f, how many of a round's updates may be arbitrary (faulty or malicious).
        server_lr: Scale of the combined update applied to the global adapter.
    """

    def __init__(self, byzantine: int = 1, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        if isinstance(byzantine, bool) or not isinstance(byzantine, int) or byzantine < 0:
            raise ValueError(f"strategy.byzantine={byzantine!r}: the number of bad updates tolerated, an integer >= 0.")
        self.byzantine = byzantine


def coordinate_median(rows: torch.Tensor) -> torch.Tensor:
    """The median of each column (the mean of the two middle values for an even count). By sorting, not
    ``torch.quantile``, which refuses inputs over 2^24 values (a 10-client round of a 1.7M-value adapter)."""
    ordered, count = rows.sort(dim=0).values, rows.shape[0]
    return ordered[(count - 1) // 2 : count // 2 + 1].mean(dim=0)


def clipped(rows: torch.Tensor, bound: float) -> torch.Tensor:
    """Each row scaled down to L2 norm at most ``bound`` (rows within it are unchanged)."""
    norms = rows.norm(dim=1, keepdim=True)
    return rows * torch.clamp(bound / norms.clamp_min(torch.finfo(rows.dtype).tiny), max=1.0)
