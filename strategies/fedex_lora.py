"""FedEx-LoRA (Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of
Foundation Models", ACL 2025, https://arxiv.org/abs/2410.09432).

FedAvg of LoRA's factors gives ``mean(B_i) mean(A_i)``, not the mean of the clients' products. FedEx-LoRA
averages the factors as FedAvg does and keeps the difference as a dense residual folded into the frozen
weight, so the global model computes exactly ``W + s mean_i(B_i A_i)``. With ``B_i = B + b_i`` and
``A_i = A + a_i`` the difference is ``mean_i(b_i a_i) - mean(b) mean(a)`` (the cross terms cancel), a
weighted covariance of the updates. The residuals accumulate in the global adapter under
``<module>.lora_residual`` (fedtune/adapters.py): sent to every client each round (a dense out x in
matrix per LoRA module, so the download grows to about the size of the adapted weights), checkpointed,
and exported beside the PEFT adapter as ``adapter/base_residual.safetensors`` (the model card shows how to
load it). Plaintext only: products of each client's own factors cannot be formed from a masked sum. Exact
only where the folded weight can hold the residual: the server refuses ``train.precision=bf16`` (bfloat16
weights round small residuals away) and DoRA (folding would change its weight norm) at start. Embedding
LoRA (``lora_embedding_A/B``) gets no residual and is averaged as in FedAvg.
"""

from __future__ import annotations

import torch

from fedtune.adapters import RESIDUAL, AdapterState, split_residuals
from fedtune.aggregation import RoundUpdates
from fedtune.ranks import lora_pairs
from strategies.fedavg import FedAvg


class FedExLoRA(FedAvg):
    """FedAvg of the factors plus the exact residual (server_lr 1)."""

    linear = False
    folds_residuals = True

    def __init__(self) -> None:
        super().__init__(server_lr=1.0)  # exactness holds for the mean itself, not a scaled step

    def aggregate(self, updates: RoundUpdates, server_round: int) -> AdapterState:
        """The weighted mean update, and each LoRA module's residual increment ``mean(b a) - mean(b) mean(a)``."""
        individual, shares, _ = updates.in_the_clear("FedEx-LoRA")
        combined = dict(updates.mean)
        for module, (a_key, b_key) in lora_pairs(updates.mean).items():
            pairs = [
                (update[b_key].double(), update[a_key].double(), share)
                for update, share in zip(individual, shares, strict=True)
            ]
            mean_product = sum(share * (b @ a) for b, a, share in pairs)
            mean_b, mean_a = sum(share * b for b, _, share in pairs), sum(share * a for _, a, share in pairs)
            combined[module + RESIDUAL] = (mean_product - mean_b @ mean_a).to(torch.float32)
        return combined

    def step(self, global_adapter: AdapterState, aggregate: AdapterState, server_round: int) -> AdapterState:
        """FedAvg's step on the factors; each residual increment added to the module's residual (0 at first)."""
        factors, increments = split_residuals(aggregate)
        stepped = super().step(global_adapter, factors, server_round)
        for key, increment in increments.items():
            stepped[key] = global_adapter[key] + increment if key in global_adapter else increment.clone()
        return stepped
