"""Norm bounding (Sun et al. 2019, "Can You Really Backdoor Federated Learning?",
https://arxiv.org/abs/1911.07963).

Each update is scaled down to L2 norm at most M before the (unweighted) mean, so a boosted update (model
replacement, scaling) weighs no more than an honest one. Sun et al. add "weak DP" noise on top; in fedtune
that is organisation-level DP (``privacy=client_dp``), whose clients clip before masking: the form of norm
bounding that also runs under ``secure=masking``. This server-side rule is plaintext only.
"""

from __future__ import annotations

import torch

from strategies._robust import RobustRule, clipped


class NormBounding(RobustRule):
    """The mean of the updates, each clipped to L2 norm ``max_norm``.

    Args:
        max_norm: M, the largest L2 norm one update may have in the mean. None: the median of the round's
            update norms, which fewer than half the clients cannot inflate.
        server_lr: Scale of the mean applied to the global adapter.
    """

    def __init__(self, max_norm: float | None = None, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        if max_norm is not None and not max_norm > 0:
            raise ValueError(f"strategy.max_norm={max_norm}: must be positive, or null (the round's median norm).")
        self.max_norm = max_norm

    @property
    def min_clients(self) -> int:
        """Any round: it bounds influence, it does not vote."""
        return 1

    def combine(self, rows: torch.Tensor, layout: str) -> torch.Tensor:
        """The mean of the clipped rows."""
        bound = self.max_norm if self.max_norm is not None else float(rows.norm(dim=1).median())
        return clipped(rows, bound).mean(dim=0)
