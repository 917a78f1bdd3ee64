"""FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", https://arxiv.org/abs/1909.06335): FedAvg with server momentum.

``v = β v + Δ`` and ``x = x + η v``, with Δ the round's mean update; Hsu et al. find that what matters is the
effective rate η / (1 - β), best near 1. The momentum is kept per adapter tensor in float64 and only for
the tensors a round uploaded. Runs under ``secure=masking`` (it needs only the mean).
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune import adapters
from fedtune.adapters import AdapterState
from fedtune.aggregation import ClientWeighting, RoundUpdates
from fedtune.client_settings import ClientSettings


class FedAvgM:
    """Server momentum on the example-weighted mean update.

    Args:
        server_lr: η.
        momentum: β, in [0, 1) (0 is FedAvg with ``server_lr``).
    """

    linear = True
    weighting: ClientWeighting = "examples"
    folds_residuals = False
    min_clients = 1

    def __init__(self, server_lr: float = 0.5, momentum: float = 0.5) -> None:
        if not server_lr > 0:
            raise ValueError(f"strategy.server_lr={server_lr}: must be positive.")
        if not 0 <= momentum < 1:
            raise ValueError(f"strategy.momentum={momentum}: must lie in [0, 1).")
        self.server_lr, self.momentum = server_lr, momentum
        self.velocity: dict[str, torch.Tensor] = {}

    def configure(self, server_round: int, client: str) -> ClientSettings:
        """Every client trains and uploads the whole adapter."""
        return ClientSettings()

    def aggregate(self, updates: RoundUpdates, server_round: int) -> AdapterState:
        """The weighted mean."""
        return updates.mean

    def step(self, global_adapter: AdapterState, aggregate: AdapterState, server_round: int) -> AdapterState:
        """``x + η v`` after ``v = β v + Δ``."""
        step = {}
        for key, delta in aggregate.items():
            delta = delta.to(torch.float64)
            self.velocity[key] = self.momentum * self.velocity.get(key, torch.zeros_like(delta)) + delta
            step[key] = (self.server_lr * self.velocity[key]).to(global_adapter[key].dtype)
        return adapters.apply(global_adapter, step)

    def state_dict(self) -> dict[str, Any]:
        """The velocity (checkpointed)."""
        return {"velocity": {k: t.clone() for k, t in self.velocity.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the velocity."""
        self.velocity = {k: t.clone() for k, t in state.get("velocity", {}).items()}
