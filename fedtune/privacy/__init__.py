"""Privacy mechanisms for local training (config group ``privacy``).

A mechanism turns a model and its trainable parameters into a :class:`LocalPlan`: the module to run
forward, the optimizer to step, and the batches to draw. The training loop (fedtune/training.py) runs
any plan the same way, so adding a mechanism never adds a branch to the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedtune.aggregation import Weighting


def mean_backward(losses: torch.Tensor, share: float = 1.0) -> None:
    """Backpropagate a physical batch's part of its step's mean loss: its own mean, weighted by ``share``,
    its fraction of the step's records (gradients accumulate over a step's physical batches)."""
    (losses.mean() * share).backward()


def per_record_backward(losses: torch.Tensor, share: float = 1.0) -> None:
    """Backpropagate a physical batch's mean loss, whatever its ``share``: a DP engine reads each record's own
    gradient from it, and divides the clipped sum by the expected batch size at the step."""
    losses.mean().backward()


def no_accumulation() -> None:
    """Nothing to do between physical batches: their gradients add up in ``.grad`` by themselves."""


class StepOptimizer(Protocol):
    """What the training loop steps: a torch optimizer, or a DP wrapper around one."""

    def step(self) -> Any:
        """Apply this step's gradient."""
        ...

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients for the next step."""
        ...


@dataclass
class LocalPlan:
    """How one client trains for one round.

    Attributes:
        module: What the loop calls forward on (the model, or a wrapper that records per-sample gradients).
        optimizer: What the loop steps.
        batches: Row indices of each step's batch; an empty list is a step on an empty batch.
        close: Called once after the last step (removes hooks from the cached model).
        report: Metrics the mechanism adds to the client's reply (epsilon spent, noise...).
        backward: Leaves a physical batch's gradient in the trainable parameters, given each of its records'
            loss (B,) and its share of the step's records.
        accumulate: Called after each physical batch but a step's last: folds what its backward left into the
            step (a DP engine clips its records and keeps their sum) without stepping or accounting.
    """

    module: torch.nn.Module
    optimizer: StepOptimizer
    batches: Iterator[list[int]]
    close: Callable[[], None] = lambda: None
    report: Callable[[], dict[str, float]] = dict
    backward: Callable[[torch.Tensor, float], None] = mean_backward
    accumulate: Callable[[], None] = no_accumulation


@dataclass
class PlanRequest:
    """What a privacy mechanism needs to plan one client's round.

    Attributes:
        model: The model with its adapter loaded.
        optimizer: The optimizer over the trainable parameters.
        num_examples: The client's training records.
        batch_size: Records per step (the expected number, under Poisson sampling).
        steps: Steps this round.
        total_steps: Steps planned for this client over the whole run (DP calibrates noise for them).
        generator: Seeded from the public config: batch order, and noise only where asked to be reproducible.
        state: The client's persistent privacy state, updated in place.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    num_examples: int
    batch_size: int
    steps: int
    total_steps: int
    generator: torch.Generator
    state: dict[str, Any]


class PrivacyMechanism(Protocol):
    """Builds each round's :class:`LocalPlan`; ``state`` is the client's persistent privacy state.

    Attributes:
        organisation: The organisation-level part (update clipping and noise on the aggregate,
            :class:`fedtune.privacy.client_dp.ClientDP`), or None when the mechanism has none.
        weighting: How clients must count in the mean for the guarantee to hold, or None (the strategy decides).
    """

    organisation: Any
    weighting: Weighting | None

    def plan(self, request: PlanRequest) -> LocalPlan:
        """The plan for one round of ``request.steps`` steps out of ``request.total_steps`` planned for the run."""
        ...

    def describe(self) -> str:
        """One line for the model card."""
        ...


def shuffled_batches(num_examples: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    """``steps`` batches of ``batch_size`` rows, shuffling the rows epoch after epoch (deterministic)."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(num_examples, generator=generator).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        yield batch


@dataclass(frozen=True)
class NoPrivacy:
    """No differential privacy: updates are neither clipped nor noised, and no epsilon is claimed."""

    organisation = None
    weighting = None

    def plan(self, request: PlanRequest) -> LocalPlan:
        """Plain training on shuffled fixed-size batches."""
        batches = shuffled_batches(request.num_examples, request.batch_size, request.steps, request.generator)
        return LocalPlan(request.model, request.optimizer, batches)

    def describe(self) -> str:
        """One line for the model card."""
        return "none: no differential privacy guarantee is claimed for this adapter."
