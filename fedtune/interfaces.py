"""Extension points, as Protocols. Implementations live in their own files and are picked by config."""

from __future__ import annotations

from typing import Any, Protocol

from fedtune.adapters import AdapterState
from fedtune.aggregation import ClientWeighting, RoundUpdates
from fedtune.client_settings import ClientSettings


class Strategy(Protocol):
    """A federated method on the server's side (one file in ``strategies/``, no Flower imports).

    Each round the server asks ``configure`` what each sampled client is to do, sends it with the global
    adapter, and collects the clients' updates (trained adapter minus global adapter) over the tensors
    those settings upload. It hands them to ``aggregate`` as :class:`fedtune.aggregation.RoundUpdates`
    (their weighted mean always; the individual updates only in the clear), and ``step`` turns the result
    into the next global adapter. The same calls run with and without secure aggregation.

    Attributes:
        linear: True if ``aggregate`` uses only ``updates.mean``. Only linear strategies run under
            ``secure=masking`` (the server sees only the sum) or organisation-level DP (its noise is
            calibrated to the mean); the server refuses any other combination at start.
        weighting: How clients count in the mean: ``examples`` (by training examples, FedAvg) or
            ``uniform``. Organisation-level DP overrides it with unit weights over a fixed denominator.
        folds_residuals: True if ``step`` puts dense residuals (``<module>.lora_residual``) into the global
            adapter for clients to fold into their frozen weights (FedEx-LoRA). Clients refuse residuals
            from any other strategy: a server could otherwise rewrite their base model at will.
        min_clients: The fewest updates a round may combine (a robust rule's guarantee needs enough honest
            clients, e.g. n >= 2f + 3 for Krum); the server refuses ``federation.min_train_clients`` below it.
    """

    linear: bool
    weighting: ClientWeighting
    folds_residuals: bool
    min_clients: int

    def configure(self, server_round: int, client: str) -> ClientSettings:
        """What client ``client`` (its name) does in ``server_round``: frozen tensors, proximal term..."""
        ...

    def aggregate(self, updates: RoundUpdates, server_round: int) -> AdapterState:
        """Combine the round's updates into one update over the uploaded tensors."""
        ...

    def step(self, global_adapter: AdapterState, aggregate: AdapterState, server_round: int) -> AdapterState:
        """The next global adapter: ``aggregate`` applied to ``global_adapter`` (tensors it lacks stay as they are)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Server-side state (optimizer moments...) saved in every checkpoint (tensors, numbers, strings)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on resume)."""
        ...
