"""Record-level differential privacy: DP-SGD (Abadi et al. 2016, https://arxiv.org/abs/1607.00133) with Opacus.

Each client clips every record's gradient to ``max_grad_norm``, adds Gaussian noise, and samples its
batches by Poisson sampling, so the guarantee is per patient record. The accountant's history lives
in the client's state and spans every round: the budget holds for the whole run, not per round.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedtune import devices
from fedtune.privacy import LocalPlan, PlanRequest, flat
from fedtune.privacy.engines import MODES, private_step, refuse_unsupported
from fedtune.seeding import noise_generator

# Opacus's hooks on a model whose inputs need no gradient (frozen embeddings): expected, and harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
STATE_KEY = "dp_sgd"  # where the accountant's history is kept in the client's state


class PrivacyBudgetExhaustedError(RuntimeError):
    """Training this round would spend more than the client's target epsilon."""


@dataclass(frozen=True)
class DPSGD:
    """DP-SGD on the trainable (LoRA) parameters inside each client.

    Args:
        target_epsilon: The epsilon each client may spend over the whole run; the noise multiplier is
            calibrated once from it (each client's own data size and sampling rate, all planned steps).
        noise_multiplier: A fixed noise multiplier instead of ``target_epsilon`` (set exactly one).
        max_grad_norm: Per-record gradient L2 bound C; noise has standard deviation ``noise_multiplier * C``.
        delta: Target delta; null uses 1/(10 n) for a client with n training records. Must be below 1/n.
        accountant: ``rdp`` (Rényi DP) or ``prv`` (privacy random variables, tighter).
        grad_sample_mode: How per-record gradients are computed: ``flat`` (fedtune's engine on Opacus's
            per-layer samplers, fastest for LoRA), or Opacus's ``hooks``, ``functorch``, ``ew`` or ``ghost``
            (least memory, two backward passes); see fedtune/privacy/engines.py.
        reproducible_noise: Draw noise and Poisson batches from the run's seed (research simulations only:
            anyone with the config could recompute the noise). By default they come from a secret the client
            creates and keeps in its own privacy state.

    Raises:
        ValueError: An out-of-range value, or both/neither of target_epsilon and noise_multiplier.
    """

    target_epsilon: float | None = 8.0
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    delta: float | None = None
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: Literal["flat", "hooks", "functorch", "ew", "ghost"] = "flat"
    reproducible_noise: bool = False
    organisation = None  # record level only; see RecordAndClientDP for both
    weighting = None  # per-record clipping holds whatever the clients' weights

    def __post_init__(self) -> None:
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            raise ValueError(
                "Set exactly one of privacy.target_epsilon and privacy.noise_multiplier (the other to null)."
            )
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"privacy.target_epsilon={self.target_epsilon}: must be positive.")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"privacy.noise_multiplier={self.noise_multiplier}: must be positive.")
        if not self.max_grad_norm > 0:
            raise ValueError(f"privacy.max_grad_norm={self.max_grad_norm}: must be positive.")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta={self.delta}: must lie in (0, 1) and below 1/(records per client).")
        if self.accountant not in ("rdp", "prv"):
            raise ValueError(f"privacy.accountant={self.accountant!r}: use 'rdp' or 'prv'.")
        if self.grad_sample_mode not in MODES:
            raise ValueError(f"privacy.grad_sample_mode={self.grad_sample_mode!r}: use one of {', '.join(MODES)}.")

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse trainable layers for which the chosen engine cannot compute correct per-record gradients.

        Raises:
            ValueError: DoRA or LoRA on an embedding layer (any engine); for ``flat``, a trainable layer
                without a per-record sampler in Opacus's registry; for ``ew``, a trainable non-Linear layer
                or a bfloat16 base; for ``ghost``, a trainable parameter shared by several layers.
        """
        for name, module in flat.trainable_layers(model):
            if "lora_magnitude_vector" in name or "Dora" in type(module).__name__:
                raise ValueError(f"DP-SGD cannot clip DoRA's per-record gradients ({name}); set lora.use_dora=false.")
            if isinstance(module, torch.nn.Embedding) or "lora_embedding" in name:
                raise ValueError(
                    f"DP-SGD cannot train the embedding layer {name} correctly with Opacus; remove it from "
                    "lora.target_modules and lora.modules_to_save."
                )
        refuse_unsupported(self.grad_sample_mode, model)

    def delta_for(self, num_examples: int) -> float:
        """The delta for a client with ``num_examples`` records; refuses one that does not protect each record.

        Raises:
            ValueError: delta >= 1/n: a mechanism could then publish a whole record and still meet it.
        """
        delta = self.delta if self.delta is not None else 1.0 / (10 * num_examples)
        if delta >= 1.0 / num_examples:
            raise ValueError(
                f"privacy.delta={delta} is not below 1/n = {1.0 / num_examples:.3g} for a client with n={num_examples} "
                "records: with such a delta one record could leak outright. Lower it, or leave it null for 1/(10 n)."
            )
        return delta

    def calibrate(self, num_examples: int, batch_size: int, total_steps: int) -> float:
        """The noise multiplier that spends exactly ``target_epsilon`` over ``total_steps`` (or the fixed one)."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        assert self.target_epsilon is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Optimal order is the largest alpha": expected for small budgets
            return float(
                get_noise_multiplier(
                    target_epsilon=self.target_epsilon,
                    target_delta=self.delta_for(num_examples),
                    sample_rate=sample_rate(num_examples, batch_size),
                    steps=total_steps,
                    accountant=self.accountant,
                )
            )

    def plan(self, request: PlanRequest) -> LocalPlan:
        """Wrap the model and optimizer for DP-SGD and draw Poisson batches; refuses to overspend the budget.

        Raises:
            PrivacyBudgetExhaustedError: These ``steps`` would take the client past ``target_epsilon``.
        """
        model, optimizer, num_examples, state = request.model, request.optimizer, request.num_examples, request.state
        generator = request.generator
        self.check_model(model)
        ledger = Ledger.load(state, self, num_examples, request.batch_size, request.total_steps)
        if not self.reproducible_noise:  # secret noise: ``generator`` is derived from the public config
            generator = noise_generator(state, None, "dp_sgd", ledger.steps_taken())
        if self.target_epsilon is not None and ledger.epsilon_after(request.steps) > self.target_epsilon * 1.001:
            raise PrivacyBudgetExhaustedError(
                f"This client has spent epsilon={ledger.epsilon():.3f} of its target {self.target_epsilon}; "
                f"{request.steps} more steps would exceed it, so it does not train again."
            )
        step = private_step(
            self.grad_sample_mode,
            model,
            optimizer,
            ledger.noise_multiplier,
            self.max_grad_norm,
            max(1, round(ledger.sample_rate * num_examples)),
            devices.generator_on(generator, devices.of(model)),  # Poisson batches stay on the CPU stream
            ledger.step,
        )

        def close() -> None:
            step.cleanup()  # the model is cached for later rounds: remove the engine's hooks
            ledger.save(state)

        return LocalPlan(
            step.module,
            step.optimizer,
            poisson_batches(num_examples, ledger.sample_rate, request.steps, generator),
            close,
            ledger.report,
            step.backward,
            step.accumulate,
        )

    def reproducible_seed(self, config_seed: int) -> int | None:
        """The config seed when noise is to be reproducible (research only), else None (secret noise)."""
        return config_seed if self.reproducible_noise else None

    def describe(self) -> str:
        """One line for the model card."""
        budget = (
            f"target epsilon {self.target_epsilon}"
            if self.target_epsilon
            else f"noise multiplier {self.noise_multiplier}"
        )
        delta = f"delta {self.delta}" if self.delta else "delta 1/(10 n) per client"
        return (
            f"DP-SGD per record (Opacus, {self.grad_sample_mode}): {budget} per client over the whole run, {delta}, "
            f"per-record clip {self.max_grad_norm}, Poisson sampling, {self.accountant.upper()} accountant."
        )


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate giving ``batch_size`` records per step on average."""
    return min(1.0, batch_size / num_examples)


def poisson_batches(num_examples: int, rate: float, steps: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Each step includes every record independently with probability ``rate`` (batches may be empty)."""
    for _ in range(steps):
        yield torch.nonzero(torch.rand(num_examples, generator=generator) < rate).flatten().tolist()


@dataclass
class Ledger:
    """A client's privacy accounting across rounds: what was spent, with which noise and sampling rate."""

    accountant: Any
    noise_multiplier: float
    sample_rate: float
    delta: float

    @classmethod
    def load(
        cls, state: dict[str, Any], mechanism: DPSGD, num_examples: int, batch_size: int, total_steps: int
    ) -> Ledger:
        """The ledger kept in ``state``, or a new one calibrated for the whole run."""
        accountant = create_accountant(mechanism.accountant)
        if STATE_KEY in state:
            saved = json.loads(state[STATE_KEY])
            accountant.history = [tuple(entry) for entry in saved["history"]]
            return cls(accountant, saved["noise_multiplier"], saved["sample_rate"], saved["delta"])
        noise = mechanism.calibrate(num_examples, batch_size, total_steps)
        return cls(accountant, noise, sample_rate(num_examples, batch_size), mechanism.delta_for(num_examples))

    def steps_taken(self) -> int:
        """Noisy steps accounted so far."""
        return sum(int(entry[2]) for entry in self.accountant.history)

    def step(self) -> None:
        """Account for one noisy step."""
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)

    def epsilon(self) -> float:
        """Epsilon spent so far at this ledger's delta."""
        return float(self.accountant.get_epsilon(delta=self.delta)) if self.accountant.history else 0.0

    def epsilon_after(self, steps: int) -> float:
        """Epsilon that would be spent after ``steps`` more steps."""
        projected = create_accountant(self.accountant.mechanism())
        projected.history = [*self.accountant.history, (self.noise_multiplier, self.sample_rate, steps)]
        return float(projected.get_epsilon(delta=self.delta))

    def save(self, state: dict[str, Any]) -> None:
        """Write the ledger into ``state`` (the client's persistent Flower Context state)."""
        state[STATE_KEY] = json.dumps({
            "history": [list(entry) for entry in self.accountant.history], "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate, "delta": self.delta,
        })  # fmt: skip

    def report(self) -> dict[str, float]:
        """Metrics for the client's reply."""
        return {"epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier}
