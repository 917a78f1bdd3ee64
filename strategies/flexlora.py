"""FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", NeurIPS 2024, https://arxiv.org/abs/2402.11505).

Each LoRA module's update is aggregated as the weighted mean of the clients' products ``B_i A_i`` (any
ranks: a smaller client's factors arrive zero-padded, fedtune/ranks.py), then split again by SVD,
``B = U_r S_r``, ``A = V_r^T`` at the global rank r. The components come out ordered by singular value, so
a client of rank ``r_i`` that keeps the first ``r_i`` (as fedtune's clients do) gets the best rank-``r_i``
approximation of the mean product: the paper's redistribution. Tensors outside LoRA pairs (a classifier
head) are averaged as in FedAvg. Plaintext only: a product of each client's own factors cannot be formed
from a masked sum, so the server refuses ``secure=masking`` and organisation-level DP at start.
"""

from __future__ import annotations

import torch

from fedtune.adapters import AdapterState
from fedtune.aggregation import RoundUpdates
from fedtune.ranks import lora_pairs
from strategies.fedavg import FedAvg


class FlexLoRA(FedAvg):
    """Mean of the products, redistributed by truncated SVD; everything else as FedAvg (server_lr 1)."""

    linear = False

    def __init__(self) -> None:
        super().__init__(server_lr=1.0)  # the SVD factors are the new adapter, not a direction to scale

    def aggregate(self, updates: RoundUpdates, server_round: int) -> AdapterState:
        """The update that moves each LoRA pair to the SVD factors of ``sum_i p_i B_i A_i``."""
        individual, shares, base = updates.in_the_clear("FlexLoRA")
        combined = dict(updates.mean)
        for a_key, b_key in lora_pairs(updates.mean).values():
            a, b = base[a_key].double(), base[b_key].double()
            product = sum(
                share * ((b + update[b_key].double()) @ (a + update[a_key].double()))
                for update, share in zip(individual, shares, strict=True)
            )
            left, singular, right = torch.linalg.svd(product, full_matrices=False)
            rank = a.shape[0]
            combined[a_key] = (right[:rank] - a).to(base[a_key].dtype)
            combined[b_key] = (left[:, :rank] * singular[:rank] - b).to(base[b_key].dtype)
        return combined
