"""Who masks with whom: every other client (SecAgg), or k neighbours on a ring (SecAgg+, Bell et al. 2020).

With n clients, complete-graph masking costs each client n - 1 keystreams and shares per round. SecAgg+
connects each client only to k neighbours: the clients are put on a ring in a pseudo-random order fixed
by ``seed`` (the hash of every client's revealed ring secret, fedtune/secure/masking.py: all parties compute
the same one, and no one can choose it), and each is joined to the k/2 next and k/2 previous. Masks and secret shares stay inside a client's neighbourhood, so the cost per client is
O(k) instead of O(n); the sum is still exact and dropouts are recovered inside each neighbourhood.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def neighbourhoods(names: Iterable[str], neighbours: int | None, seed: bytes) -> dict[str, frozenset[str]]:
    """Each client's neighbours (never itself); all other clients when ``neighbours`` is None or >= n - 1."""
    clients = sorted(set(names))
    if neighbours is None or neighbours >= len(clients) - 1:
        return {name: frozenset(clients) - {name} for name in clients}
    ring = sorted(clients, key=lambda name: hashlib.sha256(seed + name.encode()).digest())
    half = neighbours // 2
    return {
        name: frozenset(ring[(index + offset) % len(ring)] for offset in range(-half, half + 1) if offset)
        for index, name in enumerate(ring)
    }
