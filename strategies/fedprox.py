"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", https://arxiv.org/abs/1812.06127).

Each client minimises its loss plus ``mu/2 ||w - w_global||^2`` over the adapter, which keeps clients
with skewed data from drifting far from the global adapter within a round. The server side is unchanged
(FedAvg, or the wrapped strategy), so it runs under ``secure=masking``. Under DP-SGD the term's gradient is
added after per-record clipping and noise (fedtune/training.py, ``add_proximal_term``): it reads no
record, so it costs no privacy and clipping is unchanged.
"""

from __future__ import annotations

import math

from fedtune.client_settings import ClientSettings
from fedtune.interfaces import Strategy
from strategies._client_side import ClientSideMethod


class FedProx(ClientSideMethod):
    """FedAvg with a proximal term in every client's local objective.

    Args:
        mu: Weight of the proximal term (Li et al. try 0.001 to 1; 0 is FedAvg).
        server: The server's strategy (None: FedAvg).
    """

    def __init__(self, mu: float = 0.01, server: Strategy | None = None) -> None:
        if not (math.isfinite(mu) and mu >= 0):
            raise ValueError(f"strategy.mu={mu}: must be a finite number >= 0 (0 is plain FedAvg).")
        super().__init__(server)
        self.mu = mu

    def configure(self, server_round: int, client: str) -> ClientSettings:
        """Every client trains with the proximal term."""
        return ClientSettings(proximal_mu=self.mu)
