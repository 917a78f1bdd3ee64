"""The shared half of methods that change only what clients do: the server's side is another strategy's.

FedProx, FFA-LoRA, RoLoRA and FedSA-LoRA differ from FedAvg in ``configure`` alone (what clients train,
keep and upload), so each takes the server's aggregation and step from a strategy it wraps (FedAvg by
default). That also lets them combine with a server optimizer:
``fedtune run strategy=ffa_lora strategy@strategy.server=fedadam`` (the YAMLs take it from conf/strategy/).
"""

from __future__ import annotations

from typing import Any

from fedtune.adapters import AdapterState
from fedtune.aggregation import ClientWeighting, RoundUpdates
from fedtune.interfaces import Strategy
from strategies.fedavg import FedAvg


class ClientSideMethod:
    """Delegates everything but ``configure`` (which each method defines) to the wrapped ``server`` strategy.

    Args:
        server: The strategy that aggregates and steps on the server (None: FedAvg).
    """

    def __init__(self, server: Strategy | None = None) -> None:
        self.server: Strategy = server if server is not None else FedAvg()

    @property
    def linear(self) -> bool:
        """As the server's strategy."""
        return self.server.linear

    @property
    def weighting(self) -> ClientWeighting:
        """As the server's strategy."""
        return self.server.weighting

    @property
    def folds_residuals(self) -> bool:
        """As the server's strategy."""
        return self.server.folds_residuals

    @property
    def min_clients(self) -> int:
        """As the server's strategy."""
        return self.server.min_clients

    def aggregate(self, updates: RoundUpdates, server_round: int) -> AdapterState:
        """The server strategy's aggregate."""
        return self.server.aggregate(updates, server_round)

    def step(self, global_adapter: AdapterState, aggregate: AdapterState, server_round: int) -> AdapterState:
        """The server strategy's step."""
        return self.server.step(global_adapter, aggregate, server_round)

    def state_dict(self) -> dict[str, Any]:
        """The server strategy's state."""
        return self.server.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the server strategy's state."""
        self.server.load_state_dict(state)
