"""The shared part of the adaptive server optimizers of Reddi et al., "Adaptive Federated Optimization",
ICLR 2021 (https://arxiv.org/abs/2003.00295), Algorithm 2.

The round's mean update Δ is treated as a pseudo-gradient: ``m = β1 m + (1 - β1) Δ``, a second moment
``v`` that each method updates its own way (FedAdagrad, FedAdam, FedYogi), then
``x = x + η m / (sqrt(v) + τ)``. As in the paper, ``m`` starts at 0 and ``v`` at τ², and there is no bias
correction. Moments are kept per adapter tensor in float64 and only for the tensors a round uploaded, so a
tensor frozen this round (FFA-LoRA, RoLoRA) neither moves nor decays. Linear: they run on the masked mean.
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune import adapters
from fedtune.adapters import AdapterState
from fedtune.aggregation import ClientWeighting, RoundUpdates
from fedtune.client_settings import ClientSettings


class AdaptiveServerOptimizer:
    """Adaptive server step over the weighted mean update; subclasses define :meth:`second_moment`.

    Args:
        eta: Server learning rate η (about the per-coordinate step: the update is normalised).
        beta1: Decay of the first moment.
        tau: Adaptivity τ: keeps the step finite where v is small (v starts at τ²).
    """

    linear = True
    weighting: ClientWeighting = "examples"
    folds_residuals = False
    min_clients = 1

    def __init__(self, eta: float, beta1: float, tau: float) -> None:
        for key, value, ok in (("eta", eta, eta > 0), ("beta1", beta1, 0 <= beta1 < 1), ("tau", tau, tau > 0)):
            if not ok:
                raise ValueError(f"strategy.{key}={value}: eta and tau must be positive, beta1 in [0, 1).")
        self.eta, self.beta1, self.tau = eta, beta1, tau
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """The new v from the previous one and the squared mean update (the method's rule)."""
        raise NotImplementedError

    def configure(self, server_round: int, client: str) -> ClientSettings:
        """Every client trains and uploads the whole adapter."""
        return ClientSettings()

    def aggregate(self, updates: RoundUpdates, server_round: int) -> AdapterState:
        """The weighted mean (the pseudo-gradient)."""
        return updates.mean

    def step(self, global_adapter: AdapterState, aggregate: AdapterState, server_round: int) -> AdapterState:
        """``x + η m / (sqrt(v) + τ)`` after updating m and v with ``aggregate``."""
        step = {}
        for key, delta in aggregate.items():
            delta = delta.to(torch.float64)
            m = self.m.get(key, torch.zeros_like(delta))
            v = self.v.get(key, torch.full_like(delta, self.tau**2))
            self.m[key] = self.beta1 * m + (1 - self.beta1) * delta
            self.v[key] = self.second_moment(v, delta * delta)
            moved = self.eta * self.m[key] / (self.v[key].sqrt() + self.tau)
            step[key] = moved.to(global_adapter[key].dtype)
        return adapters.apply(global_adapter, step)

    def state_dict(self) -> dict[str, Any]:
        """The moments (checkpointed: a resumed run steps exactly as an uninterrupted one)."""
        return {"m": {k: t.clone() for k, t in self.m.items()}, "v": {k: t.clone() for k, t in self.v.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the moments."""
        self.m = {k: t.clone() for k, t in state.get("m", {}).items()}
        self.v = {k: t.clone() for k, t in state.get("v", {}).items()}
