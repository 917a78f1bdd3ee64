"""Per-record gradients in one flat buffer: Opacus's per-layer samplers without its per-tensor bookkeeping.

Opacus's ``hooks`` mode gives every trainable tensor a full module backward hook and a zero-filled copy of
its per-record gradients, and its optimizer then clips, noises and scales tensor by tensor (``scale_grad``
walks every tensor once per tensor). LoRA on every linear layer of a Llama makes hundreds of small tensors,
so that bookkeeping, not the arithmetic, is most of what DP costs a step (``benchmarks/dp_overhead.py``).

Here each trainable layer gets a forward hook and one hook on its output tensor. Backward hands that hook
the gradient of the layer's output, which becomes per-record gradients straight in the layer's columns of
one (records x parameters) float32 buffer: one batched product for a Linear layer (every LoRA matrix), the
sampler Opacus registers for the layer type (``GradSampleModule.GRAD_SAMPLERS``, the formulas ``hooks``
uses) for any other. Clipping and noising the whole adapter are then a handful of operations on that buffer.

While the engine is attached, the trainable parameters have ``requires_grad`` off: autograd would otherwise
also compute and accumulate each one's batch gradient, which DP-SGD discards. A trainable layer whose output
then needs no gradient (nothing below it trains) gets its output made a leaf that does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
from opacus.grad_sample import GradSampleModule

_SAMPLERS = GradSampleModule.GRAD_SAMPLERS  # layer type -> per-record gradient function (Opacus's registry)


def trainable_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """The modules that own trainable parameters directly, with their names."""
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            yield name, module


def unsupported_layer(model: torch.nn.Module) -> str | None:
    """The first trainable layer for which Opacus registers no per-record gradient sampler, or None."""
    for name, module in trainable_layers(model):
        if type(module) not in _SAMPLERS:
            return f"{name} ({type(module).__name__})"
    return None


class FlatPerRecordGradients:
    """Per-record gradients of every trainable parameter of ``model``, side by side in one buffer.

    A step's first hooked forward call allocates the buffer for its batch; :meth:`take_clipped_sum` consumes
    it. A parameter used by several layers, or a layer called twice, adds its contributions up, as the
    gradient of the summed loss does. Until :meth:`close`, the trainable parameters have ``requires_grad``
    off and receive no gradient from backward (see the module docstring).

    Raises:
        ValueError: A trainable layer has no per-record sampler in Opacus's registry.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        unsupported = unsupported_layer(model)
        if unsupported is not None:
            raise ValueError(f"No per-record gradient sampler for the trainable layer {unsupported}.")
        layers = [module for _, module in trainable_layers(model)]
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self._columns: dict[int, tuple[int, int]] = {}
        start = 0
        for p in self.parameters:
            self._columns[id(p)] = (start, start + p.numel())
            start += p.numel()
        self.num_values = start
        self._buffer: torch.Tensor | None = None
        self._handles = [module.register_forward_hook(self._on_forward) for module in layers]
        for p in self.parameters:
            p.requires_grad_(False)

    def columns_of(self, parameter: torch.nn.Parameter) -> tuple[int, int]:
        """Where ``parameter``'s values lie in a record's row (start, end)."""
        return self._columns[id(parameter)]

    def take_per_record(self) -> torch.Tensor | None:
        """The step's unclipped per-record gradients (records x values), releasing them; None without a batch
        (for measurements: the training step uses :meth:`take_clipped_sum`)."""
        buffer, self._buffer = self._buffer, None
        return buffer

    def take_clipped_sum(self, max_grad_norm: float) -> torch.Tensor:
        """The sum over records of each record's gradient scaled to L2 norm at most ``max_grad_norm``, flat.

        Each record's factor is ``min(1, C / (||g_i|| + 1e-6))``, as in Opacus. Without a batch (an empty
        Poisson draw ran no forward pass) the sum is zero. The buffer is released for the next step.
        """
        buffer, self._buffer = self._buffer, None
        if buffer is None:
            return torch.zeros(self.num_values, device=self.parameters[0].device)
        factors = (max_grad_norm / (torch.linalg.vector_norm(buffer, dim=1) + 1e-6)).clamp(max=1.0)
        return factors @ buffer

    def close(self) -> None:
        """Remove the hooks and make the parameters trainable again (the model is cached for later rounds)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for p in self.parameters:
            p.requires_grad_(True)
        self._buffer = None

    def _on_forward(self, module: torch.nn.Module, inputs: tuple, output: object) -> torch.Tensor | None:
        if not (module.training and torch.is_grad_enabled() and isinstance(output, torch.Tensor)):
            return None
        if not output.is_floating_point():
            return None
        activations = [t.detach() for t in inputs if isinstance(t, torch.Tensor)]
        if self._buffer is None:
            records = activations[0].shape[0]
            self._buffer = torch.zeros(records, self.num_values, device=output.device)
        if not output.requires_grad:  # nothing trainable below: backward starts its gradient here
            output = output.detach().requires_grad_(True)
        output.register_hook(partial(self._on_output_gradient, module, activations))
        return output

    def _on_output_gradient(
        self, module: torch.nn.Module, activations: list[torch.Tensor], output_gradient: torch.Tensor
    ) -> None:
        buffer = self._buffer
        assert buffer is not None, "backward ran after the step consumed its batch"
        records = buffer.shape[0]
        sampler = self._linear_per_record if type(module) is torch.nn.Linear else self._registered_per_record
        for parameter, per_record in sampler(module, activations, output_gradient).items():
            start, end = self._columns[id(parameter)]
            # The loss is the batch mean, so each record's gradient arrives divided by the batch size.
            buffer[:, start:end].view(records, *parameter.shape).add_(per_record, alpha=records)

    def _linear_per_record(
        self, layer: torch.nn.Linear, activations: list[torch.Tensor], output_gradient: torch.Tensor
    ) -> dict[torch.nn.Parameter, torch.Tensor]:
        """Opacus's Linear formulas as one batched product (its einsum costs a LoRA step several times more)."""
        inputs, gradients = activations[0], output_gradient
        if inputs.dtype != gradients.dtype:  # autocast hands float32 inputs and bfloat16 output gradients
            dtype = torch.promote_types(inputs.dtype, gradients.dtype)
            inputs, gradients = inputs.to(dtype), gradients.to(dtype)
        records = inputs.shape[0]
        inputs = inputs.reshape(records, -1, inputs.shape[-1])
        gradients = gradients.reshape(records, -1, gradients.shape[-1])
        per_record = {}
        if id(layer.weight) in self._columns:
            per_record[layer.weight] = torch.bmm(gradients.transpose(1, 2), inputs)
        if layer.bias is not None and id(layer.bias) in self._columns:
            per_record[layer.bias] = gradients.sum(dim=1)
        return per_record

    def _registered_per_record(
        self, module: torch.nn.Module, activations: list[torch.Tensor], output_gradient: torch.Tensor
    ) -> dict[torch.nn.Parameter, torch.Tensor]:
        """Opacus's registered sampler, which computes only for the parameters that require grad when called."""
        own = [p for p in module.parameters(recurse=False) if id(p) in self._columns]
        for p in own:
            p.requires_grad_(True)
        try:
            return _SAMPLERS[type(module)](module, activations, output_gradient)
        finally:
            for p in own:
                p.requires_grad_(False)


class FlatDPOptimizer:
    """DP-SGD's step on a :class:`FlatPerRecordGradients` buffer, then the wrapped optimizer's step.

    The gradient handed to ``optimizer`` is ``(clipped sum + N(0, (noise_multiplier * C)^2)) /
    expected_batch_size``, Opacus's DPOptimizer with ``loss_reduction="mean"``; the noise is drawn with
    ``generator`` (on the parameters' device) even when the batch was empty.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        gradients: FlatPerRecordGradients,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        generator: torch.Generator,
        on_step: Callable[[], None],
    ) -> None:
        self.optimizer = optimizer
        self.gradients = gradients
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.expected_batch_size = expected_batch_size
        self.generator = generator
        self.on_step = on_step
        self._accumulated: torch.Tensor | None = None

    def accumulate(self) -> None:
        """Clip the records of the physical batch backward just ran and keep their sum for the step."""
        summed = self.gradients.take_clipped_sum(self.max_grad_norm)
        self._accumulated = summed if self._accumulated is None else self._accumulated + summed

    def pre_step(self) -> None:
        """Leave the clipped, noised, averaged gradient in every trainable parameter's ``.grad``; account the step."""
        summed = self.gradients.take_clipped_sum(self.max_grad_norm)
        if self._accumulated is not None:  # the step's earlier physical batches
            summed, self._accumulated = summed + self._accumulated, None
        noise = torch.normal(
            0.0,
            self.noise_multiplier * self.max_grad_norm,
            summed.shape,
            generator=self.generator,
            device=summed.device,
        )
        gradient = (summed + noise) / self.expected_batch_size
        sizes = [p.numel() for p in self.gradients.parameters]
        for parameter, values in zip(self.gradients.parameters, gradient.split(sizes), strict=True):
            parameter.grad = values.view_as(parameter).to(parameter.dtype)
        self.on_step()

    def step(self) -> None:
        """One noisy DP-SGD step."""
        self.pre_step()
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients :meth:`pre_step` left (backward leaves none while the engine is attached)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
