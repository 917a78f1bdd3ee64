"""Adapter state: the only tensors that travel between clients and server.

``AdapterState`` maps PEFT's state-dict keys (adapter name stripped) to tensors: the LoRA A/B matrices
and any modules PEFT trains in full (such as a classification head). A method that aggregates exactly
(FedEx-LoRA) also keeps, per LoRA module, a dense residual ``R`` under ``<module>.lora_residual``: the
module computes ``W + s (R + B A)``, with its frozen weight ``W`` and PEFT's scaling ``s``. Residuals are
part of the global state (sent, checkpointed, fingerprinted) but are never trained or uploaded, and PEFT's
adapter format cannot hold them: :func:`residual_weights` gives them as base-weight deltas for the export.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Mapping, Sequence

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

AdapterState = dict[str, torch.Tensor]

RESIDUAL = ".lora_residual"
RESIDUAL_FILE = "base_residual.safetensors"  # the export's residuals, beside PEFT's adapter files
# A LoRA module's frozen weight as the base model had it, kept once a residual has been folded into it.
_ORIGINAL_WEIGHTS: weakref.WeakKeyDictionary[torch.nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


def is_residual(key: str) -> bool:
    """Whether ``key`` names a dense residual (global state, never trained or uploaded)."""
    return key.endswith(RESIDUAL)


def split_residuals(adapter: Mapping[str, torch.Tensor]) -> tuple[AdapterState, AdapterState]:
    """``adapter`` as (its trained tensors, its dense residuals)."""
    trained, residuals = {}, {}
    for key, tensor in adapter.items():
        (residuals if is_residual(key) else trained)[key] = tensor
    return trained, residuals


def get_adapter(model: PeftModel) -> AdapterState:
    """A detached CPU copy of the model's trainable adapter tensors, in a fixed key order (whatever the model's device)."""
    state = get_peft_model_state_dict(model)
    return {key: state[key].detach().to("cpu", copy=True).contiguous() for key in sorted(state)}


def set_adapter(model: PeftModel, adapter: Mapping[str, torch.Tensor]) -> None:
    """Overwrite the model's adapter tensors with ``adapter`` (copied to the model's device), and its LoRA
    modules' frozen weights with the base model's plus ``adapter``'s residuals (the base model's alone where
    ``adapter`` has none).

    Raises:
        ValueError: If ``adapter`` lacks a tensor the model has, has one it does not, or a shape differs:
            an adapter from another model or LoRA config must never be loaded half-way (nothing is changed).
    """
    trained, residuals = split_residuals(adapter)
    expected = get_peft_model_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(trained)), sorted(set(trained) - set(expected))
    if missing or unexpected:
        raise ValueError(f"Adapter does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}.")
    for key, tensor in trained.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"Adapter tensor {key} has shape {tuple(tensor.shape)}, the model expects {tuple(expected[key].shape)}."
            )
    deltas = _residual_deltas(model, residuals)  # validated before anything is written
    _fold_residuals(model, dict(deltas.values()))
    result = set_peft_model_state_dict(model, trained)
    if result.unexpected_keys:
        raise ValueError(f"PEFT did not accept adapter keys {result.unexpected_keys[:3]}.")


def residual_weights(model: PeftModel, adapter: Mapping[str, torch.Tensor]) -> AdapterState:
    """``adapter``'s residuals as what to add to the model's frozen weights (``s R``, transposed for a layer
    that stores its weight fan-in first), keyed by parameter name (``model.get_parameter(name).data +=
    delta`` loads them into a PEFT model of the exported adapter)."""
    deltas = _residual_deltas(model, split_residuals(adapter)[1])
    return {f"{_module_name(key)}.base_layer.weight": delta for key, (_, delta) in deltas.items()}


def _residual_deltas(
    model: PeftModel, residuals: Mapping[str, torch.Tensor]
) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """Each of the ``residuals`` (by key) as its LoRA module and the float32 CPU delta of that module's
    frozen weight.

    Raises:
        ValueError: A residual that names no LoRA module, or whose shape is not the module's ``out x in``.
    """
    deltas = {}
    for key, residual in residuals.items():
        module = _lora_module(model, key)
        delta = module.scaling[model.active_adapter] * residual.to("cpu", torch.float32)
        if getattr(module, "fan_in_fan_out", False):  # GPT-2's Conv1D stores W as in x out
            delta = delta.T
        weight = module.base_layer.weight
        if tuple(delta.shape) != tuple(weight.shape):
            raise ValueError(f"Residual {key} has shape {tuple(residual.shape)}, the weight {tuple(weight.shape)}.")
        deltas[key] = (module, delta.contiguous())
    return deltas


def _fold_residuals(model: PeftModel, deltas: Mapping[torch.nn.Module, torch.Tensor]) -> None:
    """Set each LoRA module's frozen weight to the base model's plus its delta (restore it where there is none)."""
    if _ORIGINAL_WEIGHTS:
        for module in model.modules():
            if module not in deltas and module in _ORIGINAL_WEIGHTS:
                module.base_layer.weight.data.copy_(_ORIGINAL_WEIGHTS.pop(module))
    for module, delta in deltas.items():
        weight = module.base_layer.weight
        if module not in _ORIGINAL_WEIGHTS:
            _ORIGINAL_WEIGHTS[module] = weight.detach().clone()
        original = _ORIGINAL_WEIGHTS[module]
        weight.data.copy_((original.to(torch.float32) + delta.to(weight.device)).to(weight.dtype))


def _module_name(residual_key: str) -> str:
    return residual_key.removesuffix(RESIDUAL)


def _lora_module(model: PeftModel, residual_key: str) -> torch.nn.Module:
    name = _module_name(residual_key)
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if module is None or not hasattr(module, "base_layer"):
        raise ValueError(f"Residual {residual_key} names no LoRA module of the model.")
    return module


def subtract(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> AdapterState:
    """``a - b`` key by key (a client's update is its trained adapter minus the global one)."""
    _check_same_keys(a, b)
    return {key: a[key] - b[key] for key in a}


def apply(global_adapter: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> AdapterState:
    """``global_adapter + update`` for the tensors ``update`` holds; the others are kept (frozen this round).

    Raises:
        ValueError: ``update`` holds a tensor the adapter does not.
    """
    unknown = sorted(set(update) - set(global_adapter))
    if unknown:
        raise ValueError(f"Update tensors {unknown[:3]} are not in the adapter.")
    return {key: tensor + update[key] if key in update else tensor for key, tensor in global_adapter.items()}


def set_trainable(model: PeftModel, frozen: tuple[str, ...]) -> None:
    """Train every adapter parameter except those whose name holds one of the ``frozen`` fragments.

    Adapter parameters are the ones PEFT keeps under the active adapter's name (LoRA matrices, a copied
    classifier head); the base model stays frozen. Set every round: the model is cached across rounds and
    strategies that alternate what they train (RoLoRA).
    """
    marker = f".{model.active_adapter}."
    for name, parameter in model.named_parameters():
        if marker in name:
            parameter.requires_grad = not any(fragment in name for fragment in frozen)


def check_update(update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    """Refuse an update that cannot be a valid client update for ``reference`` (the global adapter).

    Raises:
        ValueError: Different tensor names, a shape or dtype that differs, or a NaN/infinite value.
    """
    _check_same_keys(update, reference)
    for key, tensor in update.items():
        if tensor.shape != reference[key].shape or tensor.dtype != reference[key].dtype:
            raise ValueError(
                f"update tensor {key} is {tensor.dtype}{tuple(tensor.shape)}, expected "
                f"{reference[key].dtype}{tuple(reference[key].shape)}."
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"update tensor {key} holds NaN or infinite values.")


def as_rows(updates: Sequence[Mapping[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
    """The tensor names (sorted) and one float64 row per update, its tensors flattened in that order."""
    keys = sorted(updates[0])
    return keys, torch.stack([torch.cat([u[key].reshape(-1).to(torch.float64) for key in keys]) for u in updates])


def l2_norm(adapter: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors together, as if flattened into one vector (accumulated in float64)."""
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in adapter.values()))


def num_parameters(adapter: Mapping[str, torch.Tensor]) -> int:
    """Number of scalar values in the adapter."""
    return sum(t.numel() for t in adapter.values())


def num_bytes(adapter: Mapping[str, torch.Tensor]) -> int:
    """Size of the adapter's raw tensor data in bytes."""
    return sum(t.numel() * t.element_size() for t in adapter.values())


def fingerprint(adapter: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over keys, dtypes, shapes and bytes: equal fingerprints mean bit-identical adapters."""
    digest = hashlib.sha256()
    for key in sorted(adapter):
        tensor = adapter[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _check_same_keys(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> None:
    if a.keys() != b.keys():
        raise ValueError(f"Adapters have different tensors: {sorted(set(a) ^ set(b))[:3]}.")
