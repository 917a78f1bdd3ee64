"""FedAvg over adapter updates (McMahan et al. 2017, https://arxiv.org/abs/1602.05629).

Runs under ``secure=masking``: it needs only the weighted mean. Plain torch, no Flower imports. Note:
averaging LoRA's A and B factors separately is not the average of the products B·A; FedAvg on the
factors is nevertheless the standard baseline (FedIT, FlowerTune). FFA-LoRA and RoLoRA make it exact.
"""

from __future__ import annotations

from typing import Any

from fedtune import adapters
from fedtune.adapters import AdapterState
from fedtune.aggregation import ClientWeighting, RoundUpdates
from fedtune.client_settings import ClientSettings


class FedAvg:
    """Example-weighted mean of client updates, applied with a server learning rate.

    Args:
        server_lr: Scale of the averaged update applied to the global adapter (1.0 = classic FedAvg).

    Example:
        >>> import torch
        >>> strategy = FedAvg(server_lr=0.5)
        >>> mean = strategy.aggregate(RoundUpdates({"w": torch.ones(2)}, contributors=3), server_round=1)
        >>> strategy.step({"w": torch.zeros(2)}, mean, server_round=1)["w"].tolist()
        [0.5, 0.5]
    """

    linear = True
    weighting: ClientWeighting = "examples"
    folds_residuals = False
    min_clients = 1

    def __init__(self, server_lr: float = 1.0) -> None:
        if not server_lr > 0:
            raise ValueError(f"strategy.server_lr={server_lr}: must be positive (1.0 is plain FedAvg).")
        self.server_lr = server_lr

    def configure(self, server_round: int, client: str) -> ClientSettings:
        """Every client trains and uploads the whole adapter."""
        return ClientSettings()

    def aggregate(self, updates: RoundUpdates, server_round: int) -> AdapterState:
        """The weighted mean."""
        return updates.mean

    def step(self, global_adapter: AdapterState, aggregate: AdapterState, server_round: int) -> AdapterState:
        """``global + server_lr * mean_update``."""
        return adapters.apply(global_adapter, {key: self.server_lr * value for key, value in aggregate.items()})

    def state_dict(self) -> dict[str, Any]:
        """FedAvg keeps no state across rounds."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""
