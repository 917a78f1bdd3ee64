"""Organisation-level differential privacy: DP-FedAvg (McMahan et al. 2018, https://arxiv.org/abs/1710.06963).

Protects whether a hospital took part at all (add/remove neighbours, below). Each client clips its whole
adapter update to an L2 bound S; the average of the clipped updates gets Gaussian noise of standard
deviation z·S/n (n = the planned round size), and an accountant composes the rounds. Where the noise is
added decides whom the hospitals must trust:

- ``noise_at: server``: the server adds all of it after aggregation. Trust: the server adds the noise
  honestly and does not publish the noise-free aggregate (with secure aggregation it still never sees
  one hospital's update).
- ``noise_at: clients``: each sampled client adds an n-th of the noise variance to its clipped update
  before it leaves the hospital, so the sum carries the full noise and the server never holds a
  noise-free aggregate. Trust: the other sampled clients add their share; when only k of the n upload,
  the sum carries noise multiplier z·sqrt(k/n), and that is what the accountant charges for the round.

The guarantee is for add/remove neighbours (a federation with one organisation more or fewer). The mean
divides the sum by the round's size as the config plans it (public), never by a count of who came: a
divisor that moved with the federation would itself tell. A round with a fixed-size sample of the
organisations is charged for the sampled place one organisation can take from another
(:func:`round_mechanisms`). Dropouts are accounted for the noise left, which assumes that whether a
client drops out does not depend on its data.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

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

    def privatize_aggregate(self, mean: AdapterState, divisor: int, generator: torch.Generator) -> AdapterState:
        """Add the server's noise to a sum of clipped updates divided by ``divisor`` (the planned round size)."""
        if self.noise_at == "server":
            return _add_noise(mean, self.noise_multiplier * self.clip_norm / divisor, generator)
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
        self, state: dict[str, Any], planned: int | None, population: int, contributors: int, expected: int
    ) -> float:
        """Account one released sum in ``state`` (the server's checkpointed privacy state) and return epsilon so
        far: ``planned`` organisations of the ``population`` connected were to be sampled (None: every one),
        ``contributors`` of the ``expected`` uploaded (their noise is what the sum carries).

        Raises:
            ValueError: delta is not below 1/population.
        """
        if self.delta >= 1.0 / population:
            raise ValueError(
                f"privacy.delta={self.delta} is not below 1/{population} organisations; lower it so that "
                "no single organisation's participation can leak outright."
            )
        released = self.noise_multiplier_of(contributors, expected)
        rounds = _rounds(state)
        rounds.append([list(pair) for pair in round_mechanisms(planned, population, released)])
        state[STATE_KEY] = json.dumps(rounds)
        return self.epsilon(state)

    def epsilon(self, state: dict[str, Any]) -> float:
        """Epsilon of every round accounted in ``state``, at ``delta`` (RDP composed, then converted)."""
        # Rounds charged alike are composed at once: the sampled Gaussian's RDP takes ~0.1 s a mechanism.
        alike = Counter(json.dumps(alternatives) for alternatives in _rounds(state))
        rdp = sum((count * _worst_rdp(json.loads(key)) for key, count in alike.items()), np.zeros(len(ORDERS)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Optimal order is the largest alpha" for large epsilons
            epsilon, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=self.delta)
        return float(epsilon)

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


ORDERS = list(RDPAccountant.DEFAULT_ALPHAS)  # Rényi orders the accountant tracks (Opacus's)


def round_mechanisms(planned: int | None, population: int, noise_multiplier: float) -> list[tuple[float, float]]:
    """What one round is charged as, for add/remove neighbours (one organisation more or fewer): sampled Gaussian
    mechanisms (sample rate, noise multiplier) on the sum, the round's RDP being the largest of theirs.

    With every connected organisation in the round (``planned`` None, or above the population by one more),
    a neighbour's sum differs by one clipped update: the Gaussian at z. With a fixed-size sample of
    ``planned`` < N, one organisation more can take a sampled place from another, so coupled samples' sums
    differ by up to 2S; the larger federation's output is the smaller one's with probability 1 - m/N and
    one with a place swapped otherwise, and by the joint quasi-convexity of Rényi divergence (van Erven and
    Harremoës 2014, Thm 13) over that coupling the round is bounded by the sampled Gaussian at rate m/N and
    z/2. Poisson amplification at m/N with z, what was charged before, under-reports: a fixed-size sample
    is not Poisson sampling (Lebeda et al. 2024 on this pitfall). With exactly N = m connected, the smaller
    neighbour has every organisation in and the larger one a place to take, so both are charged.
    """
    if planned is None or planned > population:
        return [(1.0, noise_multiplier)]
    if planned == population:
        return [(1.0, noise_multiplier), (planned / (population + 1), noise_multiplier / 2)]
    return [(planned / population, noise_multiplier / 2)]


def _worst_rdp(alternatives: list[list[float]]) -> np.ndarray:
    return np.max([compute_rdp(q=q, noise_multiplier=z, steps=1, orders=ORDERS) for q, z in alternatives], axis=0)


def _rounds(state: dict[str, Any]) -> list[list[list[float]]]:
    """The rounds accounted in ``state``, each as its mechanisms; a state written by Opacus's RDP accountant
    (``[noise multiplier, sample rate, steps]`` entries, before fixed-size samples were charged as such) reads
    as that many rounds of one mechanism each."""
    rounds = []
    for entry in json.loads(state.get(STATE_KEY, "[]")):
        if entry and isinstance(entry[0], (int, float)):
            noise_multiplier, sample_rate, steps = entry
            rounds.extend([[[sample_rate, noise_multiplier]]] * int(steps))
        else:
            rounds.append(entry)
    return rounds


def clip_update(update: Mapping[str, torch.Tensor], bound: float) -> AdapterState:
    """Scale ``update`` so that its global L2 norm (over all tensors) is at most ``bound``."""
    factor = min(1.0, bound / (l2_norm(update) + 1e-12))
    return {key: tensor * factor for key, tensor in update.items()}


def _add_noise(state: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> AdapterState:
    return {key: t + torch.randn(t.shape, generator=generator, dtype=t.dtype) * std for key, t in state.items()}
