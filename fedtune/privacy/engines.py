"""How a DP-SGD step gets each record's clipped gradient: fedtune's flat engine or one of Opacus's.

``privacy.grad_sample_mode`` picks one:

- ``flat`` (default): per-record gradients from Opacus's per-layer samplers, written into one flat buffer
  and clipped and noised in a few whole-adapter operations (fedtune/privacy/flat.py). Fastest where the
  adapter has many small tensors (LoRA on every linear layer); every trainable layer needs a sampler in
  Opacus's registry (``opacus.grad_sample.register_grad_sampler`` adds one for a new layer type).
- ``hooks``: Opacus's GradSampleModule (module hooks; functorch for layers without a registered sampler).
- ``functorch``: the same, with functorch's vmap for every layer.
- ``ew``: PyTorch's expanded weights (Linear layers only).
- ``ghost``: ghost clipping (Li et al. 2021, https://arxiv.org/abs/2110.05679): per-record gradient norms
  without per-record gradients, then a second backward pass over the clipped loss; least memory.

Every engine clips each record's gradient to ``max_grad_norm``, adds N(0, (sigma C)^2) to the sum, divides
by the expected batch size, and also steps (adding noise, and accounted) on an empty Poisson batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping

from fedtune.privacy import StepOptimizer, per_record_backward
from fedtune.privacy.flat import FlatDPOptimizer, FlatPerRecordGradients, trainable_layers, unsupported_layer

MODES = ("flat", "hooks", "functorch", "ew", "ghost")


@dataclass
class PrivateStep:
    """What one engine gives the training loop.

    Attributes:
        module: What to run forward (the model itself, or Opacus's wrapper of it).
        optimizer: Clips, noises and steps.
        backward: Leaves a physical batch's gradient, given each record's loss and the batch's share.
        accumulate: Clips a physical batch's records and adds them to the step's sum, without stepping.
        cleanup: Removes the engine's hooks from the (cached) model.
    """

    module: torch.nn.Module
    optimizer: StepOptimizer
    backward: Callable[[torch.Tensor, float], None]
    accumulate: Callable[[], None]
    cleanup: Callable[[], None]


def private_step(
    mode: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator,
    on_step: Callable[[], None],
) -> PrivateStep:
    """Set ``model`` and ``optimizer`` up for DP-SGD with the engine ``mode``; ``on_step`` accounts each step.

    ``generator`` draws the noise and must live on the parameters' device.
    """
    if mode == "flat":
        gradients = FlatPerRecordGradients(model)
        flat = FlatDPOptimizer(
            optimizer, gradients, noise_multiplier, max_grad_norm, expected_batch_size, generator, on_step
        )
        return PrivateStep(model, flat, per_record_backward, flat.accumulate, gradients.close)
    module = _grad_sample_module(model, mode, max_grad_norm)
    optimizer_class = _GhostDPOptimizer if mode == "ghost" else _PerRecordDPOptimizer
    dp_optimizer = optimizer_class(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )
    dp_optimizer.attach_step_hook(lambda _: on_step())
    backward = partial(_ghost_backward, module, dp_optimizer) if mode == "ghost" else per_record_backward
    return PrivateStep(module, dp_optimizer, backward, partial(_skipped_step, dp_optimizer), module.cleanup)


def _skipped_step(optimizer: DPOptimizer) -> None:
    """Opacus's gradient accumulation (as its BatchMemoryManager drives it): a step told to skip clips the
    physical batch's records into ``summed_grad`` and stops there; ``zero_grad`` after a skipped step drops
    the per-record gradients and keeps the sum. Neither noise nor accounting happens until the real step."""
    optimizer.signal_skip_step(do_skip=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def refuse_unsupported(mode: str, model: torch.nn.Module) -> None:
    """Refuse a model whose trainable layers the engine ``mode`` cannot give correct per-record gradients.

    Raises:
        ValueError: For ``flat``, a trainable layer without a sampler in Opacus's registry; for ``ew``, a
            trainable non-Linear layer or a bfloat16 base; for ``ghost``, a trainable parameter shared by
            several layers. The message names the engine to use instead.
    """
    refusal = _REFUSALS.get(mode)
    if refusal is not None:
        refusal(model)


def _refuse_without_sampler(model: torch.nn.Module) -> None:
    """The flat engine takes every layer's per-record gradients from Opacus's registered samplers."""
    unsupported = unsupported_layer(model)
    if unsupported is not None:
        raise ValueError(
            f"privacy.grad_sample_mode=flat needs a per-record gradient sampler registered with Opacus for every "
            f"trainable layer, and {unsupported} has none; use privacy.grad_sample_mode=hooks (it falls back to "
            "functorch for such layers)."
        )


def _refuse_for_expanded_weights(model: torch.nn.Module) -> None:
    """PyTorch's expanded weights handle Linear layers only, in one dtype."""
    for name, module in trainable_layers(model):
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(
                f"privacy.grad_sample_mode=ew handles only Linear layers but {name} ({type(module).__name__}) is "
                "trainable; use privacy.grad_sample_mode=flat (or hooks)."
            )
    if any(p.dtype == torch.bfloat16 for p in model.parameters()):
        raise ValueError(
            "privacy.grad_sample_mode=ew cannot run with train.precision=bf16 (expanded weights mix float32 and "
            "bfloat16 in one product); use privacy.grad_sample_mode=flat."
        )


def _refuse_tied_trainable(model: torch.nn.Module) -> None:
    """Ghost clipping adds up per-layer gradient norms, which is wrong for a parameter used by two layers."""
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            if id(parameter) in owners:
                raise ValueError(
                    f"privacy.grad_sample_mode=ghost adds up per-layer gradient norms, which is wrong for a "
                    f"parameter shared by {owners[id(parameter)]} and {name} (tied weights); untie them or "
                    "use privacy.grad_sample_mode=hooks."
                )
            owners[id(parameter)] = name


_REFUSALS = {"flat": _refuse_without_sampler, "ew": _refuse_for_expanded_weights, "ghost": _refuse_tied_trainable}


class _StepsOnEmptyBatches:
    """Mixin for Opacus's DP optimizers: also step on an empty Poisson batch (noise only; the step is accounted)."""

    params: list[torch.Tensor]

    def pre_step(self, closure: Any = None) -> bool | None:
        for p in self.params:
            self._no_records(p)
        return super().pre_step(closure)  # type: ignore[misc]

    @staticmethod
    def _no_records(p: torch.Tensor) -> None:
        """Give ``p`` the gradient of a batch without records, where backward did not run."""
        raise NotImplementedError


class _PerRecordDPOptimizer(_StepsOnEmptyBatches, DPOptimizer):
    """Clips the per-record gradients backward left in ``p.grad_sample``, sums and noises them."""

    @staticmethod
    def _no_records(p: torch.Tensor) -> None:
        if p.grad_sample is None:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)

    def scale_grad(self) -> None:
        """Divide by the expected batch size; Opacus recounts the accumulated batches for every tensor (O(n^2))."""
        divisor = self.expected_batch_size * self.accumulated_iterations
        for p in self.params:
            p.grad /= divisor


class _GhostDPOptimizer(_StepsOnEmptyBatches, DPOptimizerFastGradientClipping):
    """Noises the already clipped sum that the ghost backward left in ``p.grad``."""

    @staticmethod
    def _no_records(p: torch.Tensor) -> None:
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def _ghost_backward(
    module: GradSampleModuleFastGradientClipping,
    optimizer: _GhostDPOptimizer,
    losses: torch.Tensor,
    share: float = 1.0,
) -> None:
    """Ghost clipping's two passes: per-record gradient norms, then the gradient of the clipped loss.

    The first pass only fills the norms (its parameter gradients are dropped; after a skipped step the
    accumulated sum survives ``zero_grad``); the second, with the hooks off, backpropagates
    sum_i c_i * loss_i with c_i = min(1, C / ||g_i||), whose gradient is the sum of the clipped per-record
    gradients. ``share`` plays no part (see :func:`fedtune.privacy.per_record_backward`).
    """
    losses.mean().backward(retain_graph=True)
    optimizer.zero_grad()
    coefficients = module.get_clipping_coef().to(losses.device)
    module.disable_hooks()
    try:
        (coefficients * losses).sum().backward()
    finally:
        module.enable_hooks()


def _grad_sample_module(model: torch.nn.Module, mode: str, max_grad_norm: float) -> Any:
    """Wrap ``model`` so that backward leaves per-record gradients in ``p.grad_sample`` (ghost: their norms)."""
    if mode == "ew":
        from opacus.grad_sample import GradSampleModuleExpandedWeights

        return GradSampleModuleExpandedWeights(model, batch_first=True, loss_reduction="mean")
    if mode == "ghost":
        return GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="mean", max_grad_norm=max_grad_norm, use_ghost_clipping=True
        )
    return GradSampleModule(model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch")
