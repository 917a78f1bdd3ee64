"""Simulated malicious clients (``attack=...``): which ones misbehave, from which round, and how.

An attack is research machinery for measuring robust aggregation (benchmarks/robustness.py): it runs only
in a simulation. A deployed node refuses any experiment that composes one, so that a server cannot turn an
honest hospital into an attacker through the config it sends, and the server refuses to deploy one.

Three kinds, each in its own module:
- data poisoning (fedtune/attacks/data.py): the client trains on altered rows (label flipping, a backdoor);
- update corruption (fedtune/attacks/updates.py): the client sends something other than its trained update
  (sign flip, scaling, Gaussian noise, a free rider's zero update); these run under ``secure=masking`` too,
  inside the masked sum, where only the server's checks of the unmasked sum can catch them;
- collusion (fedtune/attacks/collusion.py): the attackers forge one update from the honest clients' updates
  (ALIE, inner-product manipulation). They need those updates in the clear, so they are refused under
  masking.

:meth:`Attack.check` refuses what cannot work (the server and every node call it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch

from fedtune.adapters import AdapterState


@dataclass(frozen=True)
class Attack:
    """Which simulated clients are malicious and from which round; this base class changes nothing
    (``attack=none``), each attack overrides what it alters.

    Args:
        clients: Partition ids of the malicious simulated clients.
        from_round: The first round in which they misbehave (before it they are honest).
    """

    clients: Sequence[int] = ()
    from_round: int = 1

    def __post_init__(self) -> None:
        ids = tuple(self.clients)
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"attack.clients={list(ids)}: distinct partition ids (integers >= 0), e.g. [0, 1].")
        if isinstance(self.from_round, bool) or not isinstance(self.from_round, int) or self.from_round < 1:
            raise ValueError(f"attack.from_round={self.from_round!r}: a round number >= 1.")
        object.__setattr__(self, "clients", tuple(sorted(ids)))

    @property
    def enabled(self) -> bool:
        """Whether any client is malicious."""
        return bool(self.clients)

    @property
    def colludes(self) -> bool:
        """True if the attackers forge their update from the honest clients' (fedtune/attacks/collusion.py)."""
        return False

    @property
    def needs_labels(self) -> bool:
        """True if the attack rewrites class labels (classification tasks only)."""
        return False

    def check(self, simulated: bool, masked: bool, classification: bool, num_clients: int) -> None:
        """Refuse this attack where it cannot run (:meth:`fedtune.experiment.Experiment.check_attack` calls it).

        Args:
            simulated: The run is a simulation (fedtune's own, in-process or Ray), not a deployment.
            masked: ``secure=masking``.
            classification: The task is classification (labels exist).
            num_clients: ``federation.num_clients``: the partition ids are ``0 .. num_clients - 1``.

        Raises:
            ValueError: A deployment, a partition id the federation does not have, a collusion attack under
                masking or with too few honest clients, or label rewriting without labels.
        """
        if not self.enabled:
            return
        if not simulated:
            raise ValueError(
                f"attack={type(self).__name__} is for simulations only (fedtune run); a deployment refuses it, so "
                "that a config cannot make an honest node attack. Remove the attack override."
            )
        if self.clients[-1] >= num_clients:  # a typo would otherwise run a clean federation, reported as attacked
            raise ValueError(
                f"attack.clients={list(self.clients)}: the federation's partition ids are 0..{num_clients - 1} "
                f"(federation.num_clients={num_clients})."
            )
        if self.colludes and masked:
            raise ValueError(
                f"attack={type(self).__name__} forges its update from the honest clients' updates, which "
                "secure=masking hides from everyone; use it with secure=none, or an attack on the client's own "
                "update (sign_flip, scaling, noise, free_rider)."
            )
        if num_clients - len(self.clients) < self.min_honest:
            raise ValueError(
                f"attack={type(self).__name__} forges from at least {self.min_honest} honest updates a round, but "
                f"attack.clients={list(self.clients)} leaves {num_clients - len(self.clients)} of "
                f"federation.num_clients={num_clients} honest; name fewer attackers."
            )
        if self.needs_labels and not classification:
            raise ValueError(f"attack={type(self).__name__} rewrites class labels: it needs a classification task.")

    @property
    def min_honest(self) -> int:
        """How many honest updates a round the attack needs (collusion forges from them; 0: none)."""
        return 0

    def active(self, partition_id: int | None, server_round: int) -> bool:
        """Whether simulated partition ``partition_id`` misbehaves in ``server_round``."""
        return partition_id in self.clients and server_round >= self.from_round

    def poison(self, train: datasets.Dataset, num_labels: int | None, seed: int) -> datasets.Dataset:
        """The rows a malicious client trains on instead of ``train`` (unchanged here)."""
        return train

    def corrupt(self, update: AdapterState, generator: torch.Generator) -> AdapterState:
        """What a malicious client sends instead of its trained ``update`` (unchanged here)."""
        return update

    def describe(self) -> str:
        """One line for logs and the model card."""
        if not self.enabled:
            return "none"
        return f"{type(self).__name__} by simulated clients {list(self.clients)} from round {self.from_round}"
