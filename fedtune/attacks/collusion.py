"""Colluding attackers who forge one update from the honest clients' updates of the round, and the channel
that plays them in a simulation.

Both attacks are omniscient, as in the robust-aggregation literature that evaluates against them: the
attackers know the round's honest updates (with the clients' data they could estimate them nearly as well).
Every attacker sends the same forged vector. They need the updates in the clear, so they are refused under
``secure=masking`` (:meth:`fedtune.attacks.Attack.check`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from fedtune.adapters import AdapterState
from fedtune.aggregation import weighted_sum
from fedtune.attacks import Attack
from fedtune.channel import Channel, Client, Collected, TrainRequest
from fedtune.client_settings import ClientSettings
from fedtune.run_dir import RunDir

PARTITION = "partition"  # the key a simulated node's description gives its partition id under


@dataclass(frozen=True)
class CollusionAttack(Attack):
    """An attack whose malicious clients send :meth:`forge` of the honest updates."""

    @property
    def colludes(self) -> bool:
        """The attackers forge from the honest updates."""
        return True

    @property
    def min_honest(self) -> int:
        """One honest update to forge from (ALIE needs two, for their spread)."""
        return 1

    def forge(self, honest: Sequence[AdapterState], round_size: int) -> AdapterState:
        """The update every attacker sends, from the round's ``honest`` updates (``round_size`` in all, the
        others the round's active attackers)."""
        raise NotImplementedError


@dataclass(frozen=True)
class ALIE(CollusionAttack):
    """ "A little is enough" (Baruch, Baruch and Goldberg 2019, NeurIPS, https://arxiv.org/abs/1902.06156):
    ``μ - z σ`` coordinate by coordinate, with μ and σ the mean and standard deviation of the honest updates.

    A shift within the honest spread in every coordinate at once evades the rules that discard outliers
    (Krum, trimmed mean, median), yet moves the model steadily. The paper's z is the largest that still keeps
    the attackers within the majority of updates closest to the mean: with s = floor(n/2 + 1) - f honest
    supporters needed, z = Φ⁻¹((n - s) / n), for the round's n clients and f attackers (those who came). It
    is 0 where the attackers are too few to move the median (1 of 10: s = 5, z = Φ⁻¹(0.5)), so they send the
    honest mean; a fixed ``z`` studies a shift anyway. Attackers who are a majority of the round need no
    supporters; s is then taken as 1, the paper's formula at its edge.

    Args:
        z: The shift in standard deviations (None: the paper's z for the round's n and f).
    """

    z: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.z is not None and not (math.isfinite(self.z) and self.z > 0):
            raise ValueError(f"attack.z={self.z}: a positive number of standard deviations, or null (the paper's).")

    @property
    def min_honest(self) -> int:
        """Two honest updates, for their standard deviation."""
        return 2

    def shift(self, round_size: int, attackers: int) -> float:
        """z for a round of ``round_size`` clients, ``attackers`` of them the attack's."""
        if self.z is not None:
            return self.z
        supporters = max(math.floor(round_size / 2 + 1) - attackers, 1)
        return statistics.NormalDist().inv_cdf((round_size - supporters) / round_size)

    def forge(self, honest: Sequence[AdapterState], round_size: int) -> AdapterState:
        """``μ - z σ`` over the honest updates (σ: sample standard deviation)."""
        if len(honest) < self.min_honest:
            raise ValueError("ALIE needs at least two honest updates to estimate their spread.")
        z = self.shift(round_size, round_size - len(honest))
        forged = {}
        for key in honest[0]:
            stacked = torch.stack([u[key].to(torch.float64) for u in honest])
            forged[key] = (stacked.mean(dim=0) - z * stacked.std(dim=0)).to(honest[0][key].dtype)
        return forged


@dataclass(frozen=True)
class InnerProductManipulation(CollusionAttack):
    """Inner-product manipulation (Xie, Koyejo and Gupta 2019, "Fall of Empires", UAI,
    https://arxiv.org/abs/1903.03936): ``-ε μ``, with μ the mean of the honest updates. A small ε slips past
    median and Krum while making the aggregate's inner product with the true direction negative once enough
    attackers join; a large ε overwhelms the mean.

    Args:
        epsilon: ε > 0.
    """

    epsilon: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.epsilon > 0:
            raise ValueError(f"attack.epsilon={self.epsilon}: must be positive.")

    def forge(self, honest: Sequence[AdapterState], round_size: int) -> AdapterState:
        """``-epsilon`` times the honest mean."""
        if len(honest) < self.min_honest:
            raise ValueError("inner-product manipulation needs at least one honest update.")
        return {
            key: (-self.epsilon * torch.stack([u[key].to(torch.float64) for u in honest]).mean(dim=0)).to(
                honest[0][key].dtype
            )
            for key in honest[0]
        }


class ColludingChannel:
    """A simulation's channel in which the attackers' updates are replaced by the forged one after they arrive
    (their honest training is discarded): what the engine then aggregates is what colluders would have sent.

    Args:
        channel: The simulation's real channel (plaintext: the individual updates are needed).
        attack: The collusion attack; its ``clients`` are partition ids, matched to each node's description.
    """

    def __init__(self, channel: Channel, attack: CollusionAttack) -> None:
        self.channel, self.attack = channel, attack
        self.run_nonce = channel.run_nonce

    def connect(self, run_dir: RunDir, resume: bool) -> list[Client]:
        """As the wrapped channel."""
        return self.channel.connect(run_dir, resume)

    def train(self, clients: list[Client], request: TrainRequest) -> Collected:
        """The wrapped channel's round, with the active attackers' updates forged from the others'."""
        collected = self.channel.train(clients, request)
        if collected.individual is None:
            raise ValueError("a collusion attack needs the updates in the clear; secure=masking hides them.")
        updates, weights = collected.individual
        attacking = [
            self.attack.active(c.client.info.get(PARTITION), request.server_round) for c in collected.contributions
        ]
        honest = [u for u, bad in zip(updates, attacking, strict=True) if not bad]
        if not any(attacking) or len(honest) < self.attack.min_honest:  # dropouts: nothing to forge from
            return collected
        forged = self.attack.forge(honest, len(updates))
        sent = tuple(forged if bad else u for u, bad in zip(updates, attacking, strict=True))
        return replace(collected, weighted_sum=weighted_sum(sent, weights), individual=(sent, weights))

    def evaluate(
        self, clients: list[Client], adapter: AdapterState, server_round: int, settings: dict[str, ClientSettings]
    ) -> list[dict[str, float]]:
        """As the wrapped channel."""
        return self.channel.evaluate(clients, adapter, server_round, settings)
