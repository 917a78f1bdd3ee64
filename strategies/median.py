"""Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
Rates", https://arxiv.org/abs/1803.01498).

Each coordinate of the aggregate is the median of the clients' values (the mean of the two middle ones for an
even count), so fewer than half the clients cannot move it outside the honest values' range. Plaintext only.
"""

from __future__ import annotations

import torch

from strategies._robust import ByzantineRule, coordinate_median


class CoordinateMedian(ByzantineRule):
    """The median of each coordinate over the round's updates.

    Args:
        byzantine: f, the bad updates a round may hold; a round needs n >= 2f + 1 updates.
        server_lr: Scale of the median update applied to the global adapter.
    """

    @property
    def min_clients(self) -> int:
        """n >= 2f + 1: an honest majority."""
        return 2 * self.byzantine + 1

    def combine(self, rows: torch.Tensor, layout: str) -> torch.Tensor:
        """The coordinate-wise median."""
        return coordinate_median(rows)
