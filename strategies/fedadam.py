"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295).

Adam on the server, with the round's mean update as the pseudo-gradient: ``v = β2 v + (1 - β2) Δ²``.
Runs under ``secure=masking`` (it needs only the mean). See strategies/_adaptive.py for the shared step.
"""

from __future__ import annotations

import torch

from strategies._adaptive import AdaptiveServerOptimizer


class FedAdam(AdaptiveServerOptimizer):
    """Adam's second moment: an exponential average of the squared mean update.

    Args:
        eta: Server learning rate η (about the per-coordinate step).
        beta1: Decay of the first moment.
        beta2: Decay of the second moment.
        tau: Adaptivity τ.
    """

    def __init__(self, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if not 0 <= beta2 < 1:
            raise ValueError(f"strategy.beta2={beta2}: must lie in [0, 1).")
        super().__init__(eta, beta1, tau)
        self.beta2 = beta2

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """``β2 v + (1 - β2) Δ²``."""
        return self.beta2 * v + (1 - self.beta2) * squared
