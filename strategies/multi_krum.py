"""Multi-Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
NeurIPS, https://arxiv.org/abs/1703.02757).

Each update is scored by the sum of its squared distances to its n - f - 2 nearest other updates; the m
updates of lowest score are averaged (m = 1 is Krum). An outlier is far from the honest cluster and is not
selected. The guarantee needs n > 2f + 2. Plaintext only.
"""

from __future__ import annotations

import torch

from strategies._robust import ByzantineRule


def krum_scores(rows: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Each row's Krum score: the sum of squared distances to its ``neighbours`` nearest other rows (Krum takes
    n - f - 2)."""
    # Direct differences, not cdist's |a|^2 + |b|^2 - 2ab (its mode beyond 25 rows), which cancels to noise for
    # updates far from the origin and close together.
    distances = torch.cdist(rows, rows, compute_mode="donot_use_mm_for_euclid_dist").square()
    distances.fill_diagonal_(torch.inf)  # a row is not its own neighbour
    return distances.sort(dim=1).values[:, :neighbours].sum(dim=1)


class MultiKrum(ByzantineRule):
    """The mean of the ``selected`` updates with the lowest Krum scores.

    Args:
        byzantine: f, the bad updates a round may hold; a round needs n >= 2f + 3 updates.
        selected: m, how many updates are averaged (None: n - f, every update Krum can vouch for; 1: Krum).
        server_lr: Scale of the averaged update applied to the global adapter.
    """

    def __init__(self, byzantine: int = 1, selected: int | None = None, server_lr: float = 1.0) -> None:
        super().__init__(byzantine, server_lr)
        if selected is not None and (isinstance(selected, bool) or not isinstance(selected, int) or selected < 1):
            raise ValueError(f"strategy.selected={selected!r}: how many updates are averaged, an integer >= 1 or null.")
        self.selected = selected

    @property
    def min_clients(self) -> int:
        """n >= 2f + 3 (Blanchard et al.), and n - f >= m so that m updates can be vouched for."""
        return max(2 * self.byzantine + 3, (self.selected or 0) + self.byzantine)

    def combine(self, rows: torch.Tensor, layout: str) -> torch.Tensor:
        """The mean of the m best-scored rows (ties broken by the lower index: the clients' sorted names)."""
        count = self.selected or rows.shape[0] - self.byzantine
        best = torch.argsort(krum_scores(rows, rows.shape[0] - self.byzantine - 2), stable=True)[:count]
        return rows[best].mean(dim=0)
