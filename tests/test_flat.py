"""The flat per-record engine (fedtune/privacy/flat.py) against an independent per-record autograd loop.

Whole-model DP-SGD with ``flat`` is also checked in test_dp_sgd.py (clipping, noise, empty batches);
these tests cover what a LoRA adapter alone does not exercise: a non-Linear layer taken from Opacus's
sampler registry, a layer called twice, a weight shared by two layers, sequence inputs, a trainable first
layer fed token ids, and clean-up.
"""

from __future__ import annotations

import pytest
import torch

from fedtune.privacy.dp_sgd import DPSGD
from fedtune.privacy.flat import FlatDPOptimizer, FlatPerRecordGradients


class _Net(torch.nn.Module):
    """Linear -> LayerNorm -> a Linear called twice -> a head whose weight is shared with another Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(6, 5)
        self.norm = torch.nn.LayerNorm(5)
        self.middle = torch.nn.Linear(5, 5)
        self.head = torch.nn.Linear(5, 3)
        self.tied = torch.nn.Linear(5, 3, bias=False)
        self.tied.weight = self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.embed(x)))
        h = torch.tanh(self.middle(torch.tanh(self.middle(h))))
        return self.head(h) + 0.5 * self.tied(h)


class _TokenNet(torch.nn.Module):
    """A trainable embedding fed token ids (nothing below it needs a gradient), then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 5)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)))


def _losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each record's loss on its tokens' mean output: (records, tokens, 3) -> (records,)."""
    return torch.nn.functional.cross_entropy(model(x).mean(dim=1), y, reduction="none")


def _clipped_sum_by_loop(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> torch.Tensor:
    """sum_i g_i * min(1, C / (||g_i|| + 1e-6)), one backward per record."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    total = torch.zeros(sum(p.numel() for p in parameters), dtype=torch.float64)
    for i in range(len(x)):
        gradients = torch.autograd.grad(_losses(model, x[i : i + 1], y[i : i + 1]).sum(), parameters)
        flat = torch.cat([g.flatten() for g in gradients]).double()
        total += flat * min(1.0, clip / (float(flat.norm()) + 1e-6))
    return total


def _clipped_sum_by_engine(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> torch.Tensor:
    """The same from one backward of the batch's mean loss through FlatPerRecordGradients."""
    gradients = FlatPerRecordGradients(model)
    try:
        _losses(model, x, y).mean().backward()
        return gradients.take_clipped_sum(clip)
    finally:
        gradients.close()


@pytest.mark.parametrize("clip", [1e-3, 1e3])  # every record clipped / none clipped
@pytest.mark.parametrize("net", ["features", "token ids"])
def test_clipped_sum_equals_a_per_record_loop(clip: float, net: str) -> None:
    torch.manual_seed(0)
    model, x = (_Net(), torch.randn(5, 4, 6)) if net == "features" else (_TokenNet(), torch.randint(0, 10, (5, 4)))
    y = torch.tensor([0, 2, 1, 1, 0])
    flat = _clipped_sum_by_engine(model, x, y, clip)
    expected = _clipped_sum_by_loop(model, x, y, clip)
    assert flat.shape == expected.shape
    assert torch.allclose(flat.double(), expected, rtol=1e-4, atol=1e-9)
    if clip < 1:  # the bound binds: the sum of 5 clipped records has norm at most 5 C
        assert float(flat.norm()) <= 5 * clip * (1 + 1e-5)


def test_no_batch_gives_a_zero_sum_and_close_removes_every_hook() -> None:
    torch.manual_seed(0)
    model = _Net()
    gradients = FlatPerRecordGradients(model)
    assert torch.equal(gradients.take_clipped_sum(1.0), torch.zeros(gradients.num_values))  # empty Poisson draw
    gradients.close()
    assert all(not module._forward_hooks for module in model.modules())
    _losses(model, torch.randn(2, 4, 6), torch.tensor([0, 1])).mean().backward()  # a plain step is unaffected
    assert gradients.take_clipped_sum(1.0).abs().sum() == 0
    assert all(p.grad is not None for p in model.parameters())


def test_backward_computes_no_batch_gradient_and_close_makes_the_adapter_trainable_again() -> None:
    torch.manual_seed(0)
    model = _Net()
    trainable = list(model.parameters())
    gradients = FlatPerRecordGradients(model)
    _losses(model, torch.randn(3, 4, 6), torch.tensor([0, 1, 2])).mean().backward()
    assert all(p.grad is None for p in trainable)  # none of the batch gradients DP-SGD would discard
    assert gradients.take_clipped_sum(1.0).abs().sum() > 0  # the per-record gradients arrived all the same
    gradients.close()
    assert all(p.requires_grad for p in trainable)


def test_optimizer_noises_averages_and_accounts_every_step() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(300, 200)
    steps: list[int] = []
    gradients = FlatPerRecordGradients(model)
    inner = torch.optim.SGD(model.parameters(), lr=0.0)
    sigma, clip, expected_batch = 0.7, 2.0, 4
    optimizer = FlatDPOptimizer(
        inner, gradients, sigma, clip, expected_batch, torch.Generator().manual_seed(1), lambda: steps.append(1)
    )
    optimizer.pre_step()  # an empty batch: noise only
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]) * expected_batch
    assert steps == [1]
    # sample std of 60,200 Gaussians: relative standard error 0.3 %; allow about 3.3 of them
    assert abs(noise.std().item() / (sigma * clip) - 1) < 0.01
    assert [p.grad.shape for p in model.parameters()] == [p.shape for p in model.parameters()]


def test_a_layer_without_a_sampler_is_refused_with_the_mode_to_use() -> None:
    class Scale(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), Scale())
    with pytest.raises(ValueError, match="1 \\(Scale\\)"):
        FlatPerRecordGradients(model)
    with pytest.raises(ValueError, match="grad_sample_mode=hooks"):
        DPSGD(grad_sample_mode="flat").check_model(model)
    DPSGD(grad_sample_mode="hooks").check_model(model)  # hooks falls back to functorch for such layers


def test_a_sampler_registered_with_opacus_extends_the_flat_engine() -> None:
    from opacus.grad_sample import register_grad_sampler

    class Gate(torch.nn.Module):  # a layer type fedtune and Opacus know nothing about
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, 5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    @register_grad_sampler(Gate)
    def gate_per_record(layer: Gate, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
        return {layer.weight: torch.einsum("n...d,n...d->nd", backprops, activations[0])}

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), Gate(), torch.nn.Tanh(), torch.nn.Linear(5, 3))

    x, y = torch.randn(4, 3, 6), torch.tensor([0, 1, 2, 1])
    flat = _clipped_sum_by_engine(model, x, y, 0.05)
    assert torch.allclose(flat.double(), _clipped_sum_by_loop(model, x, y, 0.05), rtol=1e-4, atol=1e-9)
