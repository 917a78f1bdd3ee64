"""What the round engine needs from the network, and what it gets back: no Flower in here.

The engine (fedtune/engine.py) decides who trains, what they are told, how their updates are combined
and what is recorded; a :class:`Channel` carries one round's requests to the clients and brings back
their contributions. Whether updates travel in the clear or masked (secure aggregation) is the
channel's business: either way the engine receives the weighted sum, and in the clear also each update.
The Flower channel is fedtune/grid_channel.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from fedtune.adapters import AdapterState
from fedtune.aggregation import Weighting
from fedtune.client_settings import ClientSettings
from fedtune.run_dir import RunDir


class RoundFailedError(RuntimeError):
    """Too few clients replied for a round to count; the last checkpoint is intact for resume."""


class RoundAbandoned(RuntimeError):
    """A round that cannot be applied after clients uploaded to it (or, on a SecAgg+ ring, revealed their ring
    secrets for it): it is recorded, never retried, and the run goes on (a node uploads at most once per
    round, and reveals its ring secret for one set of clients per round: fedtune/secure/uploads.py).

    Args:
        message: Why.
        revealed: How many clients' updates the server unmasked the sum of before giving up (0: none).
        round_size: The clients whose keys were verified (each one's DP noise share was for them).
    """

    def __init__(self, message: str, revealed: int = 0, round_size: int = 0) -> None:
        super().__init__(message)
        self.revealed, self.round_size = revealed, round_size


@dataclass(frozen=True)
class Client:
    """A connected node as the server knows it: its name, identity key and what it said about its data."""

    node_id: int
    key: str
    public_key: str
    info: dict[str, Any]


@dataclass(frozen=True)
class TrainRequest:
    """One round's training, as the engine asks for it.

    Attributes:
        server_round: The round.
        adapter: The global adapter every client starts from.
        settings: Each sampled client's settings (by name), from the strategy's ``configure``.
        layout: The tensors every client uploads (the global adapter's, minus frozen ones).
        weighting: How each client's update is weighted in the sum.
        next_clients: Who trains in the next round (None after the last): a masked channel has them
            prepare that round's keys during this one.
        groups: Fixed groups to mask within (contribution accounting under masking): the channel then returns
            each group's sum as well as the total. None: one sum over the round.
    """

    server_round: int
    adapter: AdapterState
    settings: dict[str, ClientSettings]
    layout: AdapterState
    weighting: Weighting
    next_clients: list[Client] | None = None
    groups: tuple[tuple[str, ...], ...] | None = None


@dataclass(frozen=True)
class Contribution:
    """One client's accepted update, as the engine may know it: metrics, and the signature it is bound by."""

    client: Client
    metrics: dict[str, float]
    digest: str  # of the whole signed reply
    signature: bytes  # the node's signature over the digest, bound to the run, round and step
    report: tuple[str, bytes] | None = None  # its signed contribution report (fedtune/contribution/reports.py)


@dataclass(frozen=True)
class GroupSum:
    """The unmasked sum of one fixed group's updates (contribution accounting under masking)."""

    members: tuple[str, ...]  # the group's clients whose updates are in the sum
    weighted_sum: AdapterState  # float64: sum of weight x update over them
    total_weight: float


@dataclass(frozen=True)
class Collected:
    """What a round's training brought back.

    Attributes:
        contributions: The clients whose updates are in the sum, sorted by name.
        weighted_sum: Sum of weight x update over them (float64), over the request's layout.
        total_weight: Sum of their weights.
        round_size: How many clients were to contribute (the denominator under organisation-level DP).
        upload_bytes: Mean bytes a contributor sent in the round.
        individual: Each contributor's update and weight, in ``contributions`` order; None when masked.
        groups: When masked within fixed groups (``TrainRequest.groups``), each group's sum; else None.
        extra: Channel-specific round metrics (aggregation error bound, message exchanges...).
    """

    contributions: list[Contribution]
    weighted_sum: AdapterState
    total_weight: float
    round_size: int
    upload_bytes: float
    individual: tuple[tuple[AdapterState, ...], tuple[float, ...]] | None = None
    groups: tuple[GroupSum, ...] | None = None
    extra: dict[str, float] = field(default_factory=dict)


class Channel(Protocol):
    """How the engine reaches clients (Flower's Grid in fedtune/grid_channel.py).

    Attributes:
        run_nonce: Fresh per server start; every reply signature is bound to it (and kept in the ledger).
    """

    run_nonce: str

    def connect(self, run_dir: RunDir, resume: bool) -> list[Client]:
        """Wait for the nodes and admit those whose identity checks out, sorted by name."""
        ...

    def train(self, clients: list[Client], request: TrainRequest) -> Collected:
        """Have ``clients`` train and collect their updates (malformed or unverified replies left out).

        Raises:
            RoundFailedError: Too few clients could start the round; nothing was revealed.
            RoundAbandoned: Clients uploaded, but the round cannot be used; it must not be retried.
        """
        ...

    def evaluate(
        self, clients: list[Client], adapter: AdapterState, server_round: int, settings: dict[str, ClientSettings]
    ) -> list[dict[str, float]]:
        """Each replying client's metrics of ``adapter`` on its own validation split (with the tensors its
        ``settings`` keep local, if any: personalised)."""
        ...
