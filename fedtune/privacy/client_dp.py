"""Organisation-level differential privacy: DP-FedAvg (McMahan et al. 2018, https://arxiv.org/abs/1710.06963).

Protects whether a hospital took part at all. Each client clips its whole adapter update to an L2
bound S; the average of the clipped updates gets Gaussian noise of standard deviation z·S/n (n = the
sampled clients), and an accountant composes the rounds. Where the noise is added decides whom the
hospitals must trust:

- ``noise_at: server``: the server adds all of it after aggregation. Trust: the server adds the noise
  honestly and does not publish the noise-free aggregate (with secure aggregation it still never sees
  one hospital's update).
- ``noise_at: clients``: each sampled client adds an n-th of the noise variance to its clipped update
  before it leaves the hospital, so the sum carries the full noise and the server never holds a
  noise-free aggregate. Trust: the other sampled clients add their share; when only k of the n upload,
  the sum carries noise multiplier z·sqrt(k/n), and that is what the accountant charges for the round.

Each round is charged as a Gaussian mechanism, without amplification by client sampling, and at z/2 when
only some organisations are sampled (:meth:`ClientDP.charge_round` says why).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from opacus.accountants import create_accountant

from fedtune.adapters import AdapterState, l2_norm
from fedtune.aggregation import Weighting
from fedtune.privacy import LocalPlan, NoPrivacy, PlanRequest

STATE_KEY = "client_dp"


@dataclass(frozen=True)
class ClientDP:
    """Clip each client's update to ``clip_norm`` and add Gaussian noise to the average.

    Args:
        clip_norm: L2 bound S on one client's whole adapter update (all tensors together).
        noise_multiplier: z; the noise on the sum of clipped updates has standard deviation z·S.
        delta: Target delta of the organisation-level guarantee (below 1/number of organisations).
        noise_at: ``server`` (added after aggregation) or ``clients`` (shared out before the update is sent).
        reproducible_noise: Seed the noise from the config seed (research simulations only: anyone with the
            config could recompute and remove it). By default it comes from a secret kept by whoever adds it.

    Raises:
        ValueError: An out-of-range value.
    """

    clip_norm: float = 0.1
    noise_multiplier: float = 1.0
    delta: float = 1e-3
    noise_at: Literal["server", "clients"] = "server"
    reproducible_noise: bool = False

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ValueError(f"privacy.clip_norm={self.clip_norm}: must be positive.")
        if not self.noise_multiplier > 0:
            raise ValueError(f"privacy.noise_multiplier={self.noise_multiplier}: must be positive.")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta={self.delta}: must lie in (0, 1), below 1/(number of organisations).")
        if self.noise_at not in ("server", "clients"):
            raise ValueError(f"privacy.noise_at={self.noise_at!r}: use 'server' or 'clients'.")

    @property
    def organisation(self) -> ClientDP:
        """This mechanism is organisation-level."""
        return self

    @property
    def weighting(self) -> Weighting:
        """Every organisation counts once, over the round's fixed size: the mean whose sensitivity (S/n) the
        noise is calibrated to."""
        return Weighting(unit=True, fixed_denominator=True)

    def plan(self, request: PlanRequest) -> LocalPlan:
        """Local training itself is not changed (no record-level DP)."""
        return NoPrivacy().plan(request)

    def privatize_update(self, update: AdapterState, num_sampled: int, generator: torch.Generator) -> AdapterState:
        """Clip the update to ``clip_norm`` (and add this client's noise share when ``noise_at=clients``)."""
        clipped = clip_update(update, self.clip_norm)
        if self.noise_at == "clients":
            return _add_noise(clipped, self.noise_multiplier * self.clip_norm / math.sqrt(num_sampled), generator)
        return clipped

    def privatize_aggregate(self, mean: AdapterState, num_sampled: int, generator: torch.Generator) -> AdapterState:
        """Add the server's noise to the unweighted mean of ``num_sampled`` clipped updates."""
        if self.noise_at == "server":
            return _add_noise(mean, self.noise_multiplier * self.clip_norm / num_sampled, generator)
        return mean

    def noise_multiplier_of(self, contributors: int, expected: int) -> float:
        """The noise multiplier a sum of ``contributors`` clipped updates really carries when ``expected``
        clients were to contribute: z, or with ``noise_at=clients`` (each client adds an ``expected``-th of
        the variance) z·sqrt(contributors / expected)."""
        if self.noise_at == "clients":
            return self.noise_multiplier * math.sqrt(contributors / expected)
        return self.noise_multiplier

    def sum_norm_bound(self, contributors: int, expected: int, dimension: int) -> float:
        """The largest L2 norm the sum of ``contributors`` clipped updates of ``dimension`` values can have,
        with their noise shares when ``noise_at=clients`` (``expected`` clients' shares make the full noise).
        Gaussian norm concentration, P(|g| > sigma (sqrt(d) + u)) <= exp(-u^2 / 2), with u = 7.5: honest
        clients exceed it with probability below 1e-12."""
        bound = contributors * self.clip_norm
        if self.noise_at == "clients":
            bound += self.noise_multiplier_of(contributors, expected) * self.clip_norm * (math.sqrt(dimension) + 7.5)
        return bound

    def charge_round(
        self, state: dict[str, Any], sampled: int, population: int, contributors: int, expected: int
    ) -> float:
        """Account one released sum: ``sampled`` of ``population`` organisations drawn, ``contributors`` of the
        ``expected`` uploaded (their noise is what the sum carries). Returns epsilon so far.

        The round is charged as a Gaussian mechanism without amplification by sampling. Every organisation
        sampled, one more or one fewer changes the sum by at most S: multiplier z. A fixed-size sample of
        fewer is not the Poisson sampling that RDP amplification assumes (each organisation in independently):
        one organisation more can take a sampled place from another, so the sums of two neighbouring
        federations differ by up to 2S, and the round is charged at z/2 (the worst case over a coupling of
        the two samples; Rényi divergence is jointly quasi-convex). Claiming Poisson amplification at m/N
        here would under-report epsilon."""
        released = self.noise_multiplier_of(contributors, expected)
        if sampled < population:
            released /= 2
        return self.account(state, 1.0, population, released)

    def account(self, state: dict[str, Any], sample_rate: float, num_clients: int, noise_multiplier: float) -> float:
        """Record one round released with ``noise_multiplier`` in ``state`` (the server's checkpointed privacy
        state) and return epsilon so far.

        Raises:
            ValueError: delta is not below 1/num_clients.
        """
        if self.delta >= 1.0 / num_clients:
            raise ValueError(
                f"privacy.delta={self.delta} is not below 1/{num_clients} organisations; lower it so that "
                "no single organisation's participation can leak outright."
            )
        accountant = create_accountant("rdp")
        accountant.history = [tuple(entry) for entry in json.loads(state.get(STATE_KEY, "[]"))]
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        state[STATE_KEY] = json.dumps([list(entry) for entry in accountant.history])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Optimal order is the largest alpha" for large epsilons
            return float(accountant.get_epsilon(delta=self.delta))

    def reproducible_seed(self, config_seed: int) -> int | None:
        """The config seed when noise is to be reproducible (research only), else None (secret noise)."""
        return config_seed if self.reproducible_noise else None

    def describe(self) -> str:
        """One line for the model card."""
        return (
            f"DP-FedAvg per organisation: each update clipped to L2 {self.clip_norm}, Gaussian noise multiplier "
            f"{self.noise_multiplier} added by the {'server' if self.noise_at == 'server' else 'clients (shared out)'}, "
            f"delta {self.delta}, RDP accountant over rounds."
        )


def clip_update(update: Mapping[str, torch.Tensor], bound: float) -> AdapterState:
    """Scale ``update`` so that its global L2 norm (over all tensors) is at most ``bound``."""
    factor = min(1.0, bound / (l2_norm(update) + 1e-12))
    return {key: tensor * factor for key, tensor in update.items()}


def _add_noise(state: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> AdapterState:
    return {key: t + torch.randn(t.shape, generator=generator, dtype=t.dtype) * std for key, t in state.items()}
