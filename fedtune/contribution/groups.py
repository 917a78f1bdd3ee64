"""Fixed groups for contribution accounting under secure aggregation.

Under ``secure=masking`` the server must never see a sum of fewer updates than it agreed to, yet valuing
organisations needs sums of subsets: n independent subset sums give away every update (one sampled
Shapley ordering already does). So the organisations are split once per run into K groups of at least
``contribution.group_size``; masks and secret shares stay within each group (fedtune/secure/masking.py), the
server learns each group's sum and nothing finer (the K sums have rank K), and the players of the Shapley
game are the groups (Ma, Cao and Xiong, "Transparent Contribution Evaluation for Secure Federated Learning
on Blockchain", https://arxiv.org/abs/2101.10572, value groups of clients in the same way).

The server draws the groups from a seed of its own secret once the nodes have connected, and commits to
the seed in the ledger's first entry beside the groups; the last entry reveals the seed, so anyone can
check the groups came from it (:func:`draw`). Each node writes its group down the first time it is shown
it and refuses any other later in the experiment (fedtune/secure_client.py), so the server cannot regroup.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence

Groups = tuple[tuple[str, ...], ...]


def draw(names: Iterable[str], group_size: int, seed: int) -> Groups:
    """Split ``names`` into len // group_size groups of at least ``group_size`` each (sizes differ by at most
    one), in an order drawn from ``seed``; each group sorted, groups sorted by their first member.

    Raises:
        ValueError: Fewer names than one group.
    """
    members = sorted(set(names))
    count = len(members) // group_size
    if count < 1:
        raise ValueError(f"{len(members)} organisations cannot make a group of {group_size}.")
    random.Random(seed).shuffle(members)
    groups = [sorted(members[i::count]) for i in range(count)]
    return tuple(sorted(tuple(group) for group in groups))


def commitment(seed: int) -> str:
    """The hash commitment to a group seed that the ledger's first entry carries (hex)."""
    return hashlib.sha256(f"fedtune-contribution-groups|{seed}".encode()).hexdigest()


def group_of(groups: Groups, name: str) -> tuple[str, ...]:
    """The group holding ``name``.

    Raises:
        ValueError: ``name`` is in no group, or in more than one.
    """
    holding = [group for group in groups if name in group]
    if len(holding) != 1:
        raise ValueError(f"{name} is in {len(holding)} groups; every organisation is in exactly one.")
    return holding[0]


def check_partition(groups: Sequence[Sequence[str]], names: Iterable[str], group_size: int) -> Groups:
    """``groups`` as :data:`Groups`, once they split ``names`` into disjoint groups of at least ``group_size``.

    Raises:
        ValueError: A name in two groups or in none, or a group smaller than ``group_size``.
    """
    normalised = tuple(sorted(tuple(sorted(str(n) for n in group)) for group in groups))
    listed = [name for group in normalised for name in group]
    if len(listed) != len(set(listed)):
        raise ValueError("an organisation is listed in two groups.")
    missing = sorted(set(names) - set(listed))
    if missing:
        raise ValueError(f"{missing} are in no group.")
    small = [group for group in normalised if len(group) < group_size]
    if small:
        raise ValueError(f"group {list(small[0])} has fewer than contribution.group_size={group_size} members.")
    return normalised
