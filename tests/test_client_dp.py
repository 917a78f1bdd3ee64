"""Organisation-level DP: update clipping, noise on the aggregate, accounting, and a federated run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy import special, stats

from fedtune.privacy.client_dp import ORDERS, ClientDP, clip_update, round_mechanisms
from fedtune.run_dir import RunDir
from tests.conftest import tiny_overrides
from tests.nodes import federate


def _norm(state: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in state.values()))


def _zeros() -> dict[str, torch.Tensor]:
    return {"lora_A": torch.zeros(64, 32), "lora_B": torch.zeros(32, 64)}


def test_clipping_bounds_every_update_and_keeps_small_ones() -> None:
    generator = torch.Generator().manual_seed(0)
    for scale in (0.01, 1.0, 100.0):
        update = {
            "a": torch.randn(10, 4, generator=generator) * scale,
            "b": torch.randn(7, generator=generator) * scale,
        }
        clipped = clip_update(update, 0.5)
        assert _norm(clipped) <= 0.5 * (1 + 1e-6)
        if _norm(update) <= 0.5:
            assert all(torch.equal(clipped[k], update[k]) for k in update)
        else:  # direction kept, only the length changes
            assert math.isclose(_norm(clipped), 0.5, rel_tol=1e-6)
            assert torch.allclose(clipped["a"] / _norm(clipped), update["a"] / _norm(update), atol=1e-6)


@pytest.mark.parametrize("noise_at", ["server", "clients"])
def test_noise_on_the_average_has_the_calibrated_standard_deviation(noise_at: str) -> None:
    mechanism, n = ClientDP(clip_norm=0.2, noise_multiplier=1.5, noise_at=noise_at), 4  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(1)
    updates = [mechanism.privatize_update(_zeros(), n, generator) for _ in range(n)]
    mean = {k: sum(u[k] for u in updates) / n for k in updates[0]}
    noised = mechanism.privatize_aggregate(mean, n, generator)
    values = torch.cat([t.flatten() for t in noised.values()])
    expected = 1.5 * 0.2 / n  # z * S on the sum, divided by the fixed denominator n
    assert abs(values.std().item() / expected - 1) < 0.05  # 4096 samples: relative standard error 1.1 %


def test_epsilon_over_rounds_matches_opacus_rdp_analysis() -> None:
    """Every organisation in every round: five Gaussian rounds at z, as Opacus's RDP analysis composes them."""
    mechanism, state = ClientDP(noise_multiplier=1.2, delta=1e-3), {}
    epsilons = [mechanism.charge_round(state, None, 10, 10, 10) for _ in range(5)]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    reference, _ = get_privacy_spent(
        orders=orders, rdp=compute_rdp(q=1.0, noise_multiplier=1.2, steps=5, orders=orders), delta=1e-3
    )
    assert math.isclose(epsilons[-1], reference, rel_tol=1e-6)
    assert epsilons == sorted(epsilons)


def _renyi(log_p: np.ndarray, log_q: np.ndarray, alpha: float, step: float) -> float:
    """D_alpha(P || Q) of two densities given as logs on one grid, by quadrature (in logs: the tails underflow)."""
    return float((special.logsumexp(alpha * log_p + (1 - alpha) * log_q) + np.log(step)) / (alpha - 1))


def test_a_fixed_size_sample_is_charged_for_the_place_one_organisation_can_take_from_another() -> None:
    """Two organisations, one sampled per round (fraction 0.5), whose clipped updates are +S and -S. With b in the
    federation a round releases N(+S, (zS)^2) or N(-S, (zS)^2) with equal chance; without it, N(+S, (zS)^2). The
    Rényi divergence of the two (quadrature, both directions) is several times what Poisson sampling at rate 1/2
    gives, which the accountant used to charge. Now both federations of the pair are charged at least the
    divergence: {a, b} (1 of 2 sampled) and {a} (its one organisation in, and b could take its place)."""
    z, clip = 1.0, 1.0
    grid, step = np.linspace(-40, 40, 800_001, retstep=True)
    without_b = stats.norm.logpdf(grid, clip, z * clip)
    with_b = np.logaddexp(without_b, stats.norm.logpdf(grid, -clip, z * clip)) + np.log(0.5)
    charged = {
        population: np.max(
            [
                compute_rdp(q=q, noise_multiplier=m, steps=1, orders=ORDERS)
                for q, m in round_mechanisms(1, population, z)
            ],
            axis=0,
        )
        for population in (1, 2)
    }
    for alpha in (2.0, 4.0, 8.0):
        true = max(_renyi(with_b, without_b, alpha, step), _renyi(without_b, with_b, alpha, step))
        poisson = compute_rdp(q=0.5, noise_multiplier=z, steps=1, orders=[alpha])[0]
        assert true > 3 * poisson  # what was charged before: far too little
        for population in (1, 2):
            assert charged[population][ORDERS.index(alpha)] >= true * (1 - 1e-6)
        assert charged[2][ORDERS.index(alpha)] == pytest.approx(true, rel=1e-3)  # and no more: the bound is tight


def test_how_a_round_is_charged_follows_who_could_take_whose_place() -> None:
    z = 1.2
    assert round_mechanisms(None, 10, z) == [(1.0, z)]  # every organisation trains, one more would too
    assert round_mechanisms(4, 3, z) == [(1.0, z)]  # 4 planned, 3 connected: one more would join, not swap
    assert round_mechanisms(4, 10, z) == [(0.4, z / 2)]
    assert round_mechanisms(4, 4, z) == [(1.0, z), (0.8, z / 2)]  # one more connected would swap in


def test_the_noise_multiplier_charged_is_the_one_the_uploads_carry() -> None:
    assert ClientDP(noise_multiplier=2.0, noise_at="server").noise_multiplier_of(6, 10) == 2.0  # added after the sum
    assert math.isclose(ClientDP(noise_multiplier=2.0, noise_at="clients").noise_multiplier_of(6, 10), 2.0 * 0.6**0.5)


def test_delta_must_be_below_one_over_the_number_of_organisations() -> None:
    with pytest.raises(ValueError, match="not below 1/4"):
        ClientDP(delta=0.3).charge_round({}, None, 4, 4, 4)


def test_both_guarantees_in_one_federated_run(tiny_bert_dir: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(
        tiny_bert_dir, tmp_path / "run", "privacy=dp_sgd_client_dp", "privacy.organisation.clip_norm=0.05"
    )
    federate(tmp_path, overrides, 2)
    lines = RunDir(tmp_path / "run").read_metrics()
    norms = [m["value"] for m in lines if m["metric"] == "update_norm" and m["scope"].startswith("client:")]
    assert len(norms) == 4 and max(norms) <= 0.05 * (1 + 1e-5)  # every update the server received is clipped
    organisation = [m["value"] for m in lines if m["metric"] == "client_dp_epsilon"]
    record = [m["value"] for m in lines if m["metric"] == "epsilon_max"]
    assert len(organisation) == 2 and organisation[0] < organisation[1]
    assert len(record) == 2 and record[1] <= 8.0 * 1.001
    card = (tmp_path / "run" / "README.md").read_text()
    assert "organisation level, whole run" in card and "record level, whole run" in card
