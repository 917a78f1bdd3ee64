"""What an operator sees of each client's update in a plaintext round, to spot one that drifts or attacks.

Logged per client and round in ``metrics.jsonl`` (scope ``client:<name>``): the update's L2 norm and its
cosine similarity to the round's weighted mean update. A sign-flipping client shows a negative cosine, a
boosting one a norm far above the others', a free rider a norm of 0. Under ``secure=masking`` no one sees
an individual update, so there is nothing to log (the server checks the unmasked sum instead).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedtune.adapters import AdapterState, as_rows


def update_statistics(updates: Sequence[AdapterState], weights: Sequence[float]) -> list[dict[str, float]]:
    """Each update's ``update_norm`` and ``cosine_to_mean`` (to the ``weights``-weighted mean; 0 for a zero
    vector), in order."""
    _, rows = as_rows(updates)
    shares = torch.tensor([float(w) for w in weights], dtype=torch.float64)
    mean = (shares[:, None] * rows).sum(dim=0) / shares.sum()
    norms, mean_norm = rows.norm(dim=1), float(mean.norm())
    statistics = []
    for row, norm in zip(rows, norms.tolist(), strict=True):
        denominator = norm * mean_norm
        cosine = float(row @ mean) / denominator if denominator > 0 else 0.0
        statistics.append({"update_norm": norm, "cosine_to_mean": cosine if math.isfinite(cosine) else 0.0})
    return statistics
