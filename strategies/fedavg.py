"""FedAvg over adapter updates (McMahan et al. 2017, https://arxiv.org/abs/1602.05629).

Plain torch, no Flower imports. Note: averaging LoRA's A and B factors separately is not the average
of the products B·A; FedAvg on the factors is nevertheless the standard baseline (FedIT, FlowerTune).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fedtune.adapters import AdapterState


class FedAvg:
    """Example-weighted mean of client updates, applied with a server learning rate.

    Args:
        server_lr: Scale of the averaged update applied to the global adapter (1.0 = classic FedAvg).

    Example:
        >>> strategy = FedAvg()
        >>> mean = strategy.aggregate([{"w": torch.ones(2)}, {"w": torch.zeros(2)}], weights=[3, 1])
        >>> mean["w"].tolist()
        [0.75, 0.75]
    """

    linear = True

    def __init__(self, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise ValueError(f"strategy.server_lr={server_lr}: must be positive (1.0 is plain FedAvg).")
        self.server_lr = server_lr

    def aggregate(self, updates: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
        """Weighted mean of ``updates``; accumulated in float64 to keep rounding error far below float32 precision."""
        if not updates or len(updates) != len(weights):
            raise ValueError(
                f"FedAvg needs one weight per update, got {len(updates)} updates and {len(weights)} weights."
            )
        total = float(sum(weights))
        if total <= 0:
            raise ValueError("FedAvg weights (client example counts) must sum to a positive number.")
        mean = {}
        for key in updates[0]:
            acc = torch.zeros_like(updates[0][key], dtype=torch.float64)
            for update, weight in zip(updates, weights, strict=True):
                acc += update[key].to(torch.float64) * (float(weight) / total)
            mean[key] = acc.to(updates[0][key].dtype)
        return mean

    def step(self, global_adapter: AdapterState, aggregate: AdapterState) -> AdapterState:
        """``global + server_lr * mean_update``."""
        return {key: global_adapter[key] + self.server_lr * aggregate[key] for key in global_adapter}

    def state_dict(self) -> dict[str, Any]:
        """FedAvg keeps no state across rounds."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""
