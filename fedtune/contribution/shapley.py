"""Shapley values of a round's players from a coalition utility, exact or by GTG-Shapley's guided sampling.

Players are numbered 0..n-1 and a coalition is a bit mask over them (bit i: player i is in it). ``utility``
maps a coalition to v(S); v(0) is the value of the round's starting model and v(all) of the model the
whole round makes. Both functions are pure arithmetic over the values they are given, so an auditor who
holds the recorded v(S) reruns them and gets the same numbers (fedtune/contribution/audit.py).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

Utility = Callable[[int], float]


@dataclass(frozen=True)
class Sampling:
    """GTG-Shapley's settings (Liu et al. 2022, "GTG-Shapley: Efficient and Accurate Participant Contribution
    Evaluation in Federated Learning", ACM TIST, https://doi.org/10.1145/3501811).

    Args:
        truncation: Within a permutation, once the coalition's value is within this fraction of
            |v(all) - v(empty)| of v(all), the players after it get a marginal of zero and no evaluation.
            It bounds how far the values' sum may miss v(all) - v(empty): by at most this fraction.
        tolerance: Stop once the estimates moved, over the last ``n`` permutations, by less than this
            fraction of their total magnitude (sum_i |change_i| / sum_i |value_i|).
        max_permutations: Stop after this many permutations in any case (at least n are drawn, so that
            every player leads one).

    Raises:
        ValueError: An out-of-range setting.
    """

    truncation: float = 0.01
    tolerance: float = 0.02
    max_permutations: int = 50

    def __post_init__(self) -> None:
        if not 0 <= self.truncation < 1:
            raise ValueError(f"truncation={self.truncation}: a fraction in [0, 1).")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance={self.tolerance}: must be positive.")
        if self.max_permutations < 1:
            raise ValueError(f"max_permutations={self.max_permutations}: at least 1.")


def exact_shapley(num_players: int, utility: Utility) -> list[float]:
    """Each player's Shapley value over all 2^n coalitions (Shapley 1953):
    phi_i = sum over S not holding i of |S|! (n - |S| - 1)! / n! x (v(S + i) - v(S)).

    The values add up to v(all) - v(empty) exactly (up to float rounding).
    """
    if num_players < 1:
        raise ValueError("Shapley values need at least one player.")
    values = [utility(mask) for mask in range(1 << num_players)]
    weights = [1.0 / (num_players * math.comb(num_players - 1, size)) for size in range(num_players)]
    shapley = []
    for player in range(num_players):
        bit, total = 1 << player, 0.0
        for mask in range(1 << num_players):
            if not mask & bit:
                total += weights[mask.bit_count()] * (values[mask | bit] - values[mask])
        shapley.append(total)
    return shapley


def gtg_shapley(num_players: int, utility: Utility, seed: int, sampling: Sampling) -> tuple[list[float], int]:
    """Shapley values estimated by GTG-Shapley's guided truncated sampling (Liu et al. 2022): permutation k
    starts with player k mod n (each player leads in turn), the rest in an order drawn from ``seed``; a
    permutation is cut once the coalition's value is close to v(all) (``sampling.truncation``); the
    estimate is the running mean of the marginals, stopped when it settles (``sampling.tolerance``).

    Unlike the paper, no round is skipped for a small overall gain: every round is credited. ``utility``
    should cache, since permutations share coalitions.

    Returns:
        The estimates, and how many permutations were drawn.
    """
    if num_players < 1:
        raise ValueError("Shapley values need at least one player.")
    rng = random.Random(seed)
    full, empty_value = (1 << num_players) - 1, utility(0)
    full_value = utility(full)
    close_enough = sampling.truncation * abs(full_value - empty_value)
    estimates, history = [0.0] * num_players, []
    drawn = 0
    while drawn < max(sampling.max_permutations, num_players):
        leader = drawn % num_players
        rest = [p for p in range(num_players) if p != leader]
        rng.shuffle(rest)
        coalition, previous = 0, empty_value
        marginals = [0.0] * num_players
        for player in (leader, *rest):
            if abs(full_value - previous) <= close_enough:
                break  # truncated: the players left add (about) nothing
            coalition |= 1 << player
            value = utility(coalition)
            marginals[player], previous = value - previous, value
        drawn += 1
        estimates = [(e * (drawn - 1) + m) / drawn for e, m in zip(estimates, marginals, strict=True)]
        history.append(estimates)
        if drawn >= 2 * num_players and _settled(history[-1], history[-1 - num_players], sampling.tolerance):
            break
    return estimates, drawn


def _settled(now: list[float], before: list[float], tolerance: float) -> bool:
    magnitude = sum(abs(v) for v in now)
    change = sum(abs(a - b) for a, b in zip(now, before, strict=True))
    return change <= tolerance * magnitude if magnitude > 0 else change == 0
