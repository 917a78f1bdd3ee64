"""Extension points, as Protocols. Implementations live in their own files and are picked by config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from fedtune.adapters import AdapterState


class Strategy(Protocol):
    """A server-side aggregation algorithm over adapter updates (one file in ``strategies/``).

    Clients send updates (trained adapter minus the global adapter). Each round the server calls
    ``aggregate`` on the updates of the clients that replied, then ``step`` to get the next global adapter.

    Attributes:
        linear: True if ``aggregate`` is exactly the example-weighted mean of the updates. Only linear
            strategies can run on a securely aggregated (masked) sum, where individual updates are never
            seen: the server then computes that mean from the unmasked sum and calls only ``step``.
    """

    linear: bool

    def aggregate(self, updates: Sequence[AdapterState], weights: Sequence[float]) -> AdapterState:
        """Combine client updates (weights are the clients' training example counts)."""
        ...

    def step(self, global_adapter: AdapterState, aggregate: AdapterState) -> AdapterState:
        """Apply the combined update to the global adapter and return the new global adapter."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Server-side state (optimizer moments...) saved in every checkpoint."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on resume)."""
        ...
