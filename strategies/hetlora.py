"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models",
EMNLP 2024, https://arxiv.org/abs/2401.06432): sparsity-weighted aggregation of zero-padded factors.

Clients train at their own ranks (fedtune/ranks.py: the first ``r_i`` components of the global adapter,
uploaded zero-padded to the global rank). The server averages the padded A and B, each client weighted by
``S_i = ||B_i A_i||_F`` over all its LoRA modules, the norm of the product its trained adapter computes (not
of its update), so that a client whose adapter does less (typically a smaller rank, which drops the other
components) counts less; tensors outside LoRA pairs (a classifier head) are averaged as in FedAvg.
The paper's rank self-pruning on the clients is not implemented. Plaintext only: the server computes each
``S_i`` from the client's update (a client that weighted itself under masking could not be checked), so the
server refuses ``secure=masking`` and organisation-level DP at start.
"""

from __future__ import annotations

import math

from fedtune.adapters import AdapterState
from fedtune.aggregation import RoundUpdates
from fedtune.ranks import lora_pairs
from strategies.fedavg import FedAvg


class HetLoRA(FedAvg):
    """LoRA factors averaged with weights proportional to ``||B_i A_i||_F``, then applied with ``server_lr``.

    Args:
        server_lr: Scale of the aggregated update (1.0: the global factors become the weighted mean).
    """

    linear = False

    def aggregate(self, updates: RoundUpdates, server_round: int) -> AdapterState:
        """The norm-weighted mean of the LoRA factors' updates; the weighted mean of the rest."""
        individual, shares, base = updates.in_the_clear("HetLoRA")
        pairs = lora_pairs(updates.mean)
        norms = [
            math.sqrt(
                sum(
                    float((((base[b] + update[b]).double() @ (base[a] + update[a]).double()) ** 2).sum())
                    for a, b in pairs.values()
                )
            )
            for update in individual
        ]
        total = sum(norms)
        weights = [norm / total for norm in norms] if total > 0 else list(shares)  # all zero: as FedAvg
        combined = dict(updates.mean)
        for key in (key for pair in pairs.values() for key in pair):
            mean = sum(weight * update[key].double() for update, weight in zip(individual, weights, strict=True))
            combined[key] = mean.to(updates.mean[key].dtype)
        return combined
