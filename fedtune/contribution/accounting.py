"""The arithmetic of contribution accounting, shared by the server and ``fedtune audit``: per-round credits
from the players' values and the nodes' signed reports, and the run's totals, shares and contribution value.

Everything here is a pure function of what the ledger records, so the auditor recomputes every number
from the ledger alone and compares.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fedtune.contribution import KINDS
from fedtune.contribution.reports import Report


def utility_shares(players: Sequence[Sequence[str]], values: Sequence[float]) -> dict[str, float]:
    """Each organisation's utility credit: its player's Shapley value, split equally within a group."""
    return {name: value / len(members) for members, value in zip(players, values, strict=True) for name in members}


DATA_RULES = ("participation", "reported", "bucket-checked", "bucket-unchecked")


def data_rule(organisation: bool, masked: bool, unit_weights: bool) -> str:
    """How a run credits data (one of :data:`DATA_RULES`), from its privacy and secure-aggregation settings."""
    if organisation:
        return "participation"
    if not masked:
        return "reported"
    return "bucket-unchecked" if unit_weights else "bucket-checked"


def credits(
    players: Sequence[Sequence[str]],
    reports: Mapping[str, Report | None],
    rule: str,
    group_weights: Sequence[float] | None = None,
) -> tuple[dict[str, float], dict[str, float], list[bool | None]]:
    """Each organisation's data and compute credit for one round, and per player whether its reported data
    checked out against what the server knows (None: nothing to check it against).

    Data, by ``rule`` (:func:`data_rule`): ``participation`` (organisation-level DP): one unit per round
    taken part in. ``reported`` (in the clear): the reported exact count. ``bucket-checked`` (masked, weights
    are example counts; ``group_weights`` holds each group's unmasked total weight): the group's total split
    over its members in proportion to their buckets' midpoints, if every member reported and the total lies
    within the sum of their buckets; otherwise no member gets data credit that round (someone misreported,
    and the server cannot tell who). ``bucket-unchecked`` (masked with unit weights, whose total only counts
    members): the midpoints as reported. Compute: steps x batch size as reported. A member without a
    (verified) report gets neither.

    Raises:
        ValueError: An unknown rule, or a masked rule without the groups' weights.
    """
    if rule not in DATA_RULES:
        raise ValueError(f"data rule {rule!r}: one of {list(DATA_RULES)}.")
    if rule == "bucket-checked" and group_weights is None:
        raise ValueError("checking reported buckets needs each group's total weight.")
    data: dict[str, float] = {}
    compute = {name: float(r.compute) if (r := reports.get(name)) else 0.0 for group in players for name in group}
    checks: list[bool | None] = []
    for index, members in enumerate(players):
        stated = [reports.get(name) for name in members]
        if rule == "participation":
            data.update(dict.fromkeys(members, 1.0))
            checks.append(None)
        elif rule in ("reported", "bucket-unchecked"):
            data.update({name: r.midpoint if r else 0.0 for name, r in zip(members, stated, strict=True)})
            checks.append(None)
        else:
            total = float(group_weights[index])  # type: ignore[index]
            counted = [r for r in stated if r is not None and r.examples is not None]
            low = sum(r.examples for r in counted)  # type: ignore[misc]
            high = sum(r.examples + r.bucket - 1 for r in counted)  # type: ignore[operator]
            consistent = len(counted) == len(members) and low <= total <= high
            midpoints = [r.midpoint for r in counted] if consistent else [0.0] * len(members)
            whole = sum(midpoints)
            for name, midpoint in zip(members, midpoints, strict=True):
                data[name] = (total * midpoint / whole if whole > 0 else total / len(members)) if consistent else 0.0
            checks.append(consistent)
    return data, compute, checks


def totals(rounds: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Each organisation's cumulative data, compute and utility credit over the given round records (the
    utility telescopes: its sum over all organisations is the run's total change in validation utility)."""
    summed: dict[str, dict[str, float]] = {}
    for record in rounds:
        for kind in KINDS:
            for name, value in record.get(kind, {}).items():
                summed.setdefault(name, dict.fromkeys(KINDS, 0.0))[kind] += float(value)
    return dict(sorted(summed.items()))


def shares(summed: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Each kind's totals as shares: c_k,i = max(C_k,i, 0) / sum_j max(C_k,j, 0) (all zero when no one has a
    positive total): a negative utility, kept in the totals, counts as none here."""
    result = {name: dict.fromkeys(KINDS, 0.0) for name in summed}
    for kind in KINDS:
        positive = {name: max(values[kind], 0.0) for name, values in summed.items()}
        whole = sum(positive.values())
        if whole > 0:
            for name, value in positive.items():
                result[name][kind] = value / whole
    return result


def contribution_values(share: Mapping[str, Mapping[str, float]], weights: Mapping[str, float]) -> dict[str, float]:
    """V_i = sum_k W_k c_k,i."""
    return {name: sum(weights[kind] * values[kind] for kind in KINDS) for name, values in share.items()}


def summary(rounds: Iterable[Mapping[str, Any]], weights: Mapping[str, float]) -> dict[str, Any]:
    """The run's totals, shares and contribution values (what the ledger's last entry records)."""
    rounds = list(rounds)
    summed = totals(rounds)
    share = shares(summed)
    return {
        "weights": dict(weights),
        "rounds": {name: sum(name in record.get("utility", {}) for record in rounds) for name in summed},
        "totals": summed,
        "shares": share,
        "value": contribution_values(share, weights),
    }
