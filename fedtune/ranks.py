"""LoRA factor pairs, and clients that train at a smaller rank than the global adapter.

A LoRA module adapts a frozen weight ``W`` (out x in) to ``W + s B A`` with ``A`` (r x in, key
``...lora_A.weight``), ``B`` (out x r, ``...lora_B.weight``) and PEFT's scaling ``s``. Methods that look
at the product ``B A`` (FlexLoRA, HetLoRA, FedEx-LoRA) find the pairs with :func:`lora_pairs`.

Heterogeneous ranks (a hospital with less compute trains a smaller adapter): the global adapter has the
experiment's rank ``lora.r``, the largest. A client of rank ``r_i`` trains the first ``r_i`` components, the
first rows of each ``A`` and columns of each ``B`` (:func:`truncate`), with ``lora_alpha`` scaled by
``r_i / r`` so that PEFT's scaling ``alpha / r`` is the same at every rank: the truncated adapter computes
the rank-``r_i`` part of the global ``s B A``. Its update is its trained adapter zero-padded to the global
shapes (:func:`pad`) minus the global adapter, the zero-padding of HetLoRA (Cho et al., EMNLP 2024,
https://arxiv.org/abs/2401.06432): every update has the global layout, so a round still sums one layout,
masked or not, and FedAvg of such updates is the mean of the zero-padded factors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedtune.adapters import AdapterState

LORA_A, LORA_B = "lora_A.weight", "lora_B.weight"


def lora_pairs(adapter: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Each LoRA module's (A key, B key), by module name (the key without ``.lora_A.weight``), for the
    modules whose A and B are both in ``adapter`` (a round that freezes A uploads only B)."""
    modules = sorted(key.removesuffix(LORA_A) for key in adapter if key.endswith(LORA_A))
    return {module.rstrip("."): (module + LORA_A, module + LORA_B) for module in modules if module + LORA_B in adapter}


def rank_of(adapter: Mapping[str, torch.Tensor]) -> int:
    """The adapter's LoRA rank (that of its first module).

    Raises:
        ValueError: The adapter has no LoRA module.
    """
    pairs = lora_pairs(adapter)
    if not pairs:
        raise ValueError("the adapter has no LoRA module (no lora_A/lora_B tensors).")
    return adapter[next(iter(pairs.values()))[0]].shape[0]


def truncate(adapter: Mapping[str, torch.Tensor], rank: int) -> AdapterState:
    """The first ``rank`` components of every LoRA module (rows of A, columns of B); other tensors as they are."""
    truncated = dict(adapter)
    for a_key, b_key in lora_pairs(adapter).values():
        if adapter[a_key].shape[0] < rank:
            raise ValueError(f"cannot truncate {a_key} of rank {adapter[a_key].shape[0]} to rank {rank}.")
        truncated[a_key] = adapter[a_key][:rank].clone()
        truncated[b_key] = adapter[b_key][:, :rank].clone()
    return truncated


def pad(adapter: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> AdapterState:
    """``adapter``'s LoRA factors zero-padded to the shapes in ``like`` (the global adapter); others as they are."""
    padded = dict(adapter)
    for a_key, b_key in lora_pairs(adapter).values():
        rank = adapter[a_key].shape[0]
        padded[a_key] = torch.zeros_like(like[a_key])
        padded[a_key][:rank] = adapter[a_key]
        padded[b_key] = torch.zeros_like(like[b_key])
        padded[b_key][:, :rank] = adapter[b_key]
    return padded
