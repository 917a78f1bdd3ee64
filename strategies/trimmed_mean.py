"""Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", https://arxiv.org/abs/1803.01498).

For each coordinate the f largest and f smallest values are dropped and the rest averaged, so f bad updates
can move a coordinate only within the range of the honest ones. Plaintext only.
"""

from __future__ import annotations

import torch

from strategies._robust import ByzantineRule


class TrimmedMean(ByzantineRule):
    """The mean of each coordinate after dropping its ``byzantine`` largest and smallest values.

    Args:
        byzantine: f, the values trimmed from each end; a round needs n >= 2f + 1 updates.
        server_lr: Scale of the trimmed-mean update applied to the global adapter.
    """

    @property
    def min_clients(self) -> int:
        """n >= 2f + 1: at least one value is left after trimming."""
        return 2 * self.byzantine + 1

    def combine(self, rows: torch.Tensor, layout: str) -> torch.Tensor:
        """The trimmed mean of each column."""
        ordered = rows.sort(dim=0).values
        return ordered[self.byzantine : rows.shape[0] - self.byzantine].mean(dim=0)
