"""Who masks with whom on a SecAgg+ ring (Bell et al. 2020).

With n clients, complete-graph masking costs each client n - 1 keystreams and shares per round. SecAgg+
connects each client only to k neighbours: the clients are put on a ring in a pseudo-random order fixed
by ``seed`` (fedtune/secure/masking.py hashes every client's revealed ring secret into it: all parties
compute the same order and no one can choose it), and each is joined to the k/2 next and k/2 previous.
Masks and secret shares stay inside a client's neighbourhood, so the cost per client is O(k) instead of
O(n); the sum is still exact and dropouts are recovered inside each neighbourhood.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def ring_neighbourhoods(names: Iterable[str], neighbours: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Each client's ``neighbours`` ring neighbours (never itself), for fewer neighbours than other clients.

    Raises:
        ValueError: ``neighbours`` is not even or would join a client to every other.
    """
    clients = sorted(set(names))
    if neighbours % 2 or not 2 <= neighbours < len(clients) - 1:
        raise ValueError(f"A ring of {len(clients)} clients cannot give each {neighbours} neighbours.")
    ring = sorted(clients, key=lambda name: hashlib.sha256(seed + name.encode()).digest())
    half = neighbours // 2
    return {
        name: frozenset(ring[(index + offset) % len(ring)] for offset in range(-half, half + 1) if offset)
        for index, name in enumerate(ring)
    }
