"""FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295).

Yogi on the server: ``v = v - (1 - β2) Δ² sign(v - Δ²)``, so v changes by at most (1 - β2) Δ² a round
and does not collapse after a few small updates the way Adam's average can. Runs under
``secure=masking``. See strategies/_adaptive.py for the shared step.
"""

from __future__ import annotations

import torch

from strategies._adaptive import AdaptiveServerOptimizer


class FedYogi(AdaptiveServerOptimizer):
    """Yogi's additive, sign-controlled second moment.

    Args:
        eta: Server learning rate η (about the per-coordinate step).
        beta1: Decay of the first moment.
        beta2: Controls how fast v follows the squared mean update.
        tau: Adaptivity τ.
    """

    def __init__(self, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        if not 0 <= beta2 < 1:
            raise ValueError(f"strategy.beta2={beta2}: must lie in [0, 1).")
        super().__init__(eta, beta1, tau)
        self.beta2 = beta2

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """``v - (1 - β2) Δ² sign(v - Δ²)``."""
        return v - (1 - self.beta2) * squared * torch.sign(v - squared)
