"""FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, https://arxiv.org/abs/2003.00295).

Adagrad on the server: ``v = v + Δ²``, so each coordinate's step shrinks with the updates it has seen.
Runs under ``secure=masking``. See strategies/_adaptive.py for the shared step.
"""

from __future__ import annotations

import torch

from strategies._adaptive import AdaptiveServerOptimizer


class FedAdagrad(AdaptiveServerOptimizer):
    """Adagrad's second moment: the running sum of squared mean updates.

    Args:
        eta: Server learning rate η (larger than FedAdam's: v only grows).
        beta1: Decay of the first moment.
        tau: Adaptivity τ.
    """

    def __init__(self, eta: float = 1e-1, beta1: float = 0.9, tau: float = 1e-3) -> None:
        super().__init__(eta, beta1, tau)

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """``v + Δ²``."""
        return v + squared
