"""The server's side of a round's contribution accounting: coalition models, their utility, Shapley values.

A coalition's model is what the round would have made of only its players' updates: their weighted mean
(as :class:`fedtune.aggregation.Weighting` forms the round's own), aggregated and stepped by a copy of the
run's strategy in its state before the round, so v(all) is the round's own new model and v(empty) the one it
started from. (A robust rule applies no update from fewer clients than its ``min_clients``: such a
coalition's model is the starting one. Organisation-level DP noise is left out of every coalition, the
whole round's included: noise is nobody's contribution.) A coalition's utility is minus the model's
loss on the server's validation rows, loss rather than accuracy so that small DP-noised improvements still
register. The record returned goes into the round's ledger entry.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedtune.adapters import AdapterState
from fedtune.aggregation import RoundUpdates, Weighting, weighted_sum
from fedtune.contribution import ShapleyContribution
from fedtune.contribution.accounting import credits, utility_shares
from fedtune.contribution.reports import Report
from fedtune.contribution.shapley import exact_shapley, gtg_shapley
from fedtune.interfaces import Strategy


@dataclass(frozen=True)
class Player:
    """One player of a round's Shapley game: a client in the clear, a fixed group under masking.

    Attributes:
        members: The organisations it stands for.
        weighted_sum: Sum of weight x update over its members (float64).
        weight: Sum of its members' weights.
        update: The member's own update, in the clear (a non-linear strategy needs it); None for a group.
    """

    members: tuple[str, ...]
    weighted_sum: AdapterState
    weight: float
    update: AdapterState | None = None


@dataclass(frozen=True)
class RoundGame:
    """Everything a round's coalition models are made from.

    Attributes:
        players: The round's players.
        base: The global adapter the round started from.
        layout: The tensors the clients uploaded.
        strategy_state: The strategy's state before the round (each coalition steps a copy of it).
        new_strategy: Makes a fresh strategy of the run's kind.
        weighting: How the round's mean weighs its clients.
        fixed_divisor: The planned round size under organisation-level DP (the mean divides by it), else None.
        server_round: The round.
    """

    players: Sequence[Player]
    base: AdapterState
    layout: AdapterState
    strategy_state: dict[str, Any]
    new_strategy: Callable[[], Strategy]
    weighting: Weighting
    fixed_divisor: int | None
    server_round: int

    def model(self, coalition: int) -> AdapterState:
        """The global adapter the round would have made from the players in bit mask ``coalition`` alone."""
        chosen = [player for index, player in enumerate(self.players) if coalition >> index & 1]
        strategy = self.new_strategy()
        members = sum(len(player.members) for player in chosen)
        if not chosen or members < strategy.min_clients:
            return self.base
        strategy.load_state_dict(copy.deepcopy(self.strategy_state))
        total = weighted_sum([p.weighted_sum for p in chosen], [1.0] * len(chosen))
        weight = sum(p.weight for p in chosen)
        mean = self.weighting.mean(total, weight, self.fixed_divisor or members, self.layout)
        clear = all(p.update is not None for p in chosen)
        updates = RoundUpdates(
            mean,
            members,
            tuple(p.update for p in chosen) if clear else None,  # type: ignore[misc]
            tuple(p.weight for p in chosen) if clear else None,
            self.base,
        )
        return strategy.step(self.base, strategy.aggregate(updates, self.server_round), self.server_round)


def value_round(
    game: RoundGame,
    loss: Callable[[AdapterState], float],
    accounting: ShapleyContribution,
    seed: int,
    reports: Mapping[str, Report | None],
    data_rule: str,
) -> dict[str, Any]:
    """The round's contribution record: each coalition's utility, each player's Shapley value, and each
    organisation's data, compute and utility credit (see :mod:`fedtune.contribution`).

    Args:
        game: The round's players and how their coalitions' models are made.
        loss: A model's loss on the server's validation rows.
        accounting: The run's settings (exact or sampled Shapley, GTG's settings).
        seed: GTG-Shapley's sampling seed for this round.
        reports: Each contributor's verified report (None: missing or refused, so no data or compute credit).
        data_rule: How data is credited (:func:`fedtune.contribution.accounting.data_rule`); under masking
            each group's unmasked total weight (its player's ``weight``) checks the reported buckets.
    """
    started = time.perf_counter()
    utilities: dict[int, float] = {}

    def utility(coalition: int) -> float:
        if coalition not in utilities:
            utilities[coalition] = -loss(game.model(coalition))
        return utilities[coalition]

    count = len(game.players)
    if count <= accounting.exact_up_to:
        values, method, permutations = exact_shapley(count, utility), "exact", None
    else:
        values, permutations = gtg_shapley(count, utility, seed, accounting.sampling)
        method = "gtg"
    players = [list(player.members) for player in game.players]
    record: dict[str, Any] = {
        "players": players,
        "method": method,
        "utilities": {coalition_key(mask): value for mask, value in sorted(utilities.items())},
        "values": values,
        "utility": utility_shares(players, values),
        "reports": {},
        "evaluations": len(utilities),
        "seconds": time.perf_counter() - started,
    }
    if method == "gtg":
        record.update(seed=seed, permutations=permutations)
    grouped = all(player.update is None for player in game.players)  # masked: each player is a group's sum
    group_weights = [player.weight for player in game.players] if grouped else None
    data, compute, checks = credits(players, reports, data_rule, group_weights)
    record.update(data_rule=data_rule, data=data, compute=compute)
    if group_weights is not None:
        record.update(group_weights=list(group_weights), data_checked=checks)
    return record


def coalition_key(mask: int) -> str:
    """A coalition as it is written in the ledger: its players' indices joined by '+' ('' for none)."""
    return "+".join(str(i) for i in range(mask.bit_length()) if mask >> i & 1)


def coalition_mask(key: str) -> int:
    """The bit mask of a coalition written by :func:`coalition_key`.

    Raises:
        ValueError: Not such a key.
    """
    indices = [int(part) for part in key.split("+")] if key else []
    if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
        raise ValueError(f"coalition {key!r}: distinct player indices joined by '+'.")
    return sum(1 << i for i in indices)
