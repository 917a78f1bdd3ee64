"""Bulyan (El Mhamdi et al. 2018, "The Hidden Vulnerability of Distributed Learning in Byzantium", ICML,
https://arxiv.org/abs/1802.07927).

Krum is applied again and again to select θ = n - 2f updates (each time the best-scored one among those
left is moved to the selection); then, coordinate by coordinate, the β = θ - 2f selected values closest to
their median are averaged. This bounds each coordinate as well as the whole vector; it needs n >= 4f + 3.
Plaintext only.
"""

from __future__ import annotations

import torch

from strategies._robust import ByzantineRule, coordinate_median
from strategies.multi_krum import krum_scores


class Bulyan(ByzantineRule):
    """Krum selection of n - 2f updates, then the mean of the n - 4f values nearest each coordinate's median.

    Args:
        byzantine: f, the bad updates a round may hold; a round needs n >= 4f + 3 updates.
        server_lr: Scale of the aggregated update applied to the global adapter.
    """

    @property
    def min_clients(self) -> int:
        """n >= 4f + 3 (El Mhamdi et al.)."""
        return 4 * self.byzantine + 3

    def combine(self, rows: torch.Tensor, layout: str) -> torch.Tensor:
        """Iterated Krum selection, then the coordinate-wise mean of the values nearest the median."""
        f, remaining, selection = self.byzantine, list(range(rows.shape[0])), []
        while len(selection) < rows.shape[0] - 2 * f:
            # Krum over the rows left (n - f - 2 neighbours each; at least one, once few are left)
            scores = krum_scores(rows[remaining], max(1, len(remaining) - f - 2))
            selection.append(remaining.pop(int(torch.argmin(scores))))
        chosen = rows[selection]
        median = coordinate_median(chosen)
        closest = (chosen - median).abs().argsort(dim=0, stable=True)[: len(selection) - 2 * f]
        return chosen.gather(0, closest).mean(dim=0)
