"""Centered clipping (Karimireddy, He and Jaggi 2021, "Learning from History for Byzantine Robust
Optimization", ICML, https://arxiv.org/abs/2012.10333).

Starting from the previous round's aggregate v, each iteration moves v by the mean of the clients'
differences to it, each clipped to L2 norm τ: ``v = v + (1/n) Σ (x_i - v) min(1, τ / ||x_i - v||)``. A bad
update moves v by at most τ/n, however large it is; honest updates within τ of v count in full. The paper's
history is the starting point (here: the last aggregate, checkpointed); it also uses worker momentum,
which fedtune's clients do not. Plaintext only.
"""

from __future__ import annotations

from typing import Any

import torch

from strategies._robust import RobustRule, clipped


class CenteredClipping(RobustRule):
    """Iterated clipping of the updates around the previous aggregate.

    Args:
        radius: τ, the L2 norm each update's difference to the centre is clipped to. None: at each iteration
            the median of those differences' norms, which fewer than half the clients cannot inflate.
        iterations: L, clipping iterations per round (the paper finds 1 enough with momentum).
        server_lr: Scale of the aggregate applied to the global adapter.
    """

    def __init__(self, radius: float | None = None, iterations: int = 3, server_lr: float = 1.0) -> None:
        super().__init__(server_lr)
        if radius is not None and not radius > 0:
            raise ValueError(f"strategy.radius={radius}: the clipping radius must be positive, or null (median).")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"strategy.iterations={iterations!r}: an integer >= 1.")
        self.radius, self.iterations = radius, iterations
        self.center: torch.Tensor | None = None
        self.layout = ""  # the tensors ``center`` covers: a round over other tensors starts from zero

    @property
    def min_clients(self) -> int:
        """Any round: a bad update's pull is bounded by τ / n whatever n is."""
        return 1

    def combine(self, rows: torch.Tensor, layout: str) -> torch.Tensor:
        """v after ``iterations`` clipped steps from the previous aggregate."""
        center = self.center if self.center is not None and self.layout == layout else torch.zeros_like(rows[0])
        for _ in range(self.iterations):
            differences = rows - center
            radius = self.radius if self.radius is not None else float(differences.norm(dim=1).median())
            center = center + clipped(differences, radius).mean(dim=0)
        self.center, self.layout = center.clone(), layout
        return center

    def state_dict(self) -> dict[str, Any]:
        """The last aggregate (a resumed run starts its next round from the same centre)."""
        return {} if self.center is None else {"center": self.center.clone(), "layout": self.layout}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the last aggregate."""
        self.center = state["center"].clone() if "center" in state else None
        self.layout = str(state.get("layout", ""))
