"""The strategy contract, run over every ``conf/strategy/*.yaml``, and each strategy against a hand computation.

A new strategy YAML fails :func:`test_every_strategy_has_a_hand_computed_test` until it gets a row in
``HAND_COMPUTED``: the contract says a strategy is well behaved, only its own test says it is the method.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedtune import config
from fedtune.adapters import RESIDUAL, AdapterState, is_residual
from fedtune.aggregation import RoundUpdates, Weighting
from fedtune.client_settings import ClientSettings
from fedtune.experiment import Experiment
from fedtune.interfaces import Strategy
from fedtune.ranks import lora_pairs
from strategies.fedadagrad import FedAdagrad
from strategies.fedadam import FedAdam
from strategies.fedavg import FedAvg
from strategies.fedavgm import FedAvgM
from strategies.fedex_lora import FedExLoRA
from strategies.fedprox import FedProx
from strategies.fedsa_lora import FedSALoRA
from strategies.fedyogi import FedYogi
from strategies.ffa_lora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.head_only import HeadOnly
from strategies.hetlora import HetLoRA
from strategies.rolora import RoLoRA
from tests.test_robust_strategies import HAND_COMPUTED as ROBUST_HAND_COMPUTED

NAMES = sorted(p.stem for p in (config.conf_dir() / "strategy").glob("*.yaml"))


def _strategy(name: str) -> Strategy:
    return config.instantiate(config.compose([f"strategy={name}"]).strategy)


A, B, HEAD = "layer.0.query.lora_A.weight", "layer.0.query.lora_B.weight", "classifier.weight"


def _adapter(seed: int) -> dict[str, torch.Tensor]:
    """Tensors named and shaped like a rank-2 LoRA module on a 4 x 3 weight, with a classification head."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(*shape, generator=generator) for name, shape in ((A, (2, 3)), (B, (4, 2)), (HEAD, (4, 3)))
    }


def _updates(updates: list[AdapterState], base: AdapterState, weights: tuple[float, ...] | None = None) -> RoundUpdates:
    """A plaintext round's updates as the engine hands them over: weighted mean, each update, base."""
    weights = weights or (1.0,) * len(updates)
    mean = {k: sum(w * u[k] for u, w in zip(updates, weights, strict=True)) / sum(weights) for k in updates[0]}
    return RoundUpdates(mean, len(updates), tuple(updates), weights, base)


def _round_size(strategy: Strategy) -> int:
    """Updates a contract test hands a strategy: three, or as many as its guarantee needs."""
    return max(3, strategy.min_clients)


def _round(strategy: Strategy, global_adapter: dict, server_round: int, seed: int) -> dict[str, torch.Tensor]:
    """One round as the server runs it: each client's settings, the updates over that layout, aggregate, step."""
    settings = strategy.configure(server_round, "hospital-0")
    updates = [settings.uploaded(_adapter(seed + i)) for i in range(_round_size(strategy))]
    aggregate = strategy.aggregate(_updates(updates, global_adapter), server_round)
    return strategy.step(global_adapter, aggregate, server_round)


def _function(adapter: AdapterState) -> dict[str, np.ndarray]:
    """What an adapter computes: each LoRA module's ``B A`` plus its residual, and every other tensor."""
    pairs = lora_pairs(adapter)
    factors = {key for pair in pairs.values() for key in pair}
    computed = {k: v.double().numpy() for k, v in adapter.items() if k not in factors and not is_residual(k)}
    for module, (a, b) in pairs.items():
        residual = adapter.get(module + RESIDUAL, torch.zeros(1)).double().numpy()
        computed[module] = adapter[b].double().numpy() @ adapter[a].double().numpy() + residual
    return computed


@pytest.mark.parametrize("name", NAMES)
def test_config_builds_a_strategy_with_valid_declarations(name: str) -> None:
    strategy = _strategy(name)
    assert isinstance(strategy.linear, bool)
    Weighting.of(strategy.weighting)  # raises on anything but examples/uniform
    for server_round in (1, 2, 3):
        settings = strategy.configure(server_round, "hospital-0")
        assert isinstance(settings, ClientSettings)
        settings.check(_adapter(0))  # freezes only tensors that exist, and never all of them


@pytest.mark.parametrize("name", NAMES)
def test_a_zero_update_leaves_what_the_adapter_computes_as_it_was(name: str) -> None:
    """The factors themselves may be re-factorised (FlexLoRA's SVD); the products may not change."""
    strategy, start = _strategy(name), _adapter(0)
    zeros = {k: torch.zeros_like(v) for k, v in start.items()}
    stepped = strategy.step(start, strategy.aggregate(_updates([zeros] * _round_size(strategy), start), 1), 1)
    before, after = _function(start), _function(stepped)
    assert before.keys() == after.keys()
    assert all(np.allclose(after[k], before[k], rtol=0, atol=1e-6) for k in before)


@pytest.mark.parametrize("name", NAMES)
def test_tensors_a_round_did_not_upload_stay_bit_identical(name: str) -> None:
    strategy, start = _strategy(name), _adapter(0)
    partial = [{B: torch.full((4, 2), float(i + 1))} for i in range(_round_size(strategy))]
    stepped = strategy.step(start, strategy.aggregate(_updates(partial, start), 1), 1)
    assert torch.equal(stepped[A], start[A])
    assert torch.equal(stepped[HEAD], start[HEAD])
    assert not torch.equal(stepped[B], start[B])


@pytest.mark.parametrize("name", [n for n in NAMES if not _strategy(n).linear])
def test_a_strategy_that_needs_each_update_is_refused_where_only_a_sum_or_a_noised_mean_exists(name: str) -> None:
    for extra, reason in (("secure=masking", "individual update"), ("privacy=client_dp", "sensitivity of a mean")):
        with pytest.raises(ValueError, match=reason):
            Experiment(config.compose([f"strategy={name}", extra])).check_composition()


@pytest.mark.parametrize("name", NAMES)
def test_state_after_stepping_restores_a_strategy_that_continues_identically(name: str) -> None:
    stepped, adapter = _strategy(name), _adapter(0)
    for server_round in (1, 2):
        adapter = _round(stepped, adapter, server_round, seed=10 * server_round)
    restored = _strategy(name)
    restored.load_state_dict(stepped.state_dict())  # what a resumed run does with the checkpoint
    after_stepped = _round(stepped, adapter, 3, seed=30)
    after_restored = _round(restored, adapter, 3, seed=30)
    assert all(torch.equal(after_stepped[k], after_restored[k]) for k in adapter)


@pytest.mark.parametrize("name", NAMES)
def test_step_does_not_modify_its_inputs(name: str) -> None:
    strategy, start, update = _strategy(name), _adapter(0), _adapter(1)
    before = {k: v.clone() for k, v in start.items()}, {k: v.clone() for k, v in update.items()}
    others = [_adapter(2 + i) for i in range(_round_size(strategy) - 1)]
    strategy.step(start, strategy.aggregate(_updates([update, *others], start), 1), 1)
    assert all(torch.equal(start[k], before[0][k]) and torch.equal(update[k], before[1][k]) for k in start)


def _fedavg() -> None:
    stepped = FedAvg(server_lr=0.5).step({"w": torch.tensor([10.0, 10.0])}, {"w": torch.tensor([1.5, 1.0])}, 1)
    assert stepped["w"].tolist() == [10.75, 10.5]
    with pytest.raises(ValueError, match="server_lr"):
        FedAvg(server_lr=0)


def _fedavgm() -> None:
    # v1 = d1 = 2, x1 = 0 + 0.5 * 2 = 1; v2 = 0.9 * 2 + (-1) = 0.8, x2 = 1 + 0.5 * 0.8 = 1.4
    strategy = FedAvgM(server_lr=0.5, momentum=0.9)
    x1 = strategy.step({"w": torch.tensor([0.0])}, {"w": torch.tensor([2.0])}, 1)
    x2 = strategy.step(x1, {"w": torch.tensor([-1.0])}, 2)
    assert x1["w"].item() == pytest.approx(1.0) and x2["w"].item() == pytest.approx(1.4)


def _adaptive(strategy: Strategy, second_moment: Callable[[float, float], float]) -> None:
    """Two rounds of Reddi et al.'s Algorithm 2 in plain floats: m, v (from tau^2), x += eta m / (sqrt(v) + tau)."""
    eta, beta1, tau = strategy.eta, strategy.beta1, strategy.tau
    x, m, v, adapter = 0.5, 0.0, tau**2, {"w": torch.tensor([0.5], dtype=torch.float64)}
    for server_round, delta in ((1, 0.2), (2, -0.05)):
        m = beta1 * m + (1 - beta1) * delta
        v = second_moment(v, delta * delta)
        x += eta * m / (math.sqrt(v) + tau)
        adapter = strategy.step(adapter, {"w": torch.tensor([delta], dtype=torch.float64)}, server_round)
        assert adapter["w"].item() == pytest.approx(x, rel=1e-12)


def _fedadam() -> None:
    _adaptive(FedAdam(eta=0.1, beta1=0.9, beta2=0.5, tau=0.01), lambda v, d2: 0.5 * v + 0.5 * d2)


def _fedyogi() -> None:
    _adaptive(FedYogi(eta=0.1, beta1=0.9, beta2=0.5, tau=0.01), lambda v, d2: v - 0.5 * d2 * math.copysign(1, v - d2))


def _fedadagrad() -> None:
    _adaptive(FedAdagrad(eta=0.1, beta1=0.9, tau=0.01), lambda v, d2: v + d2)


def _fedprox() -> None:
    # The client side of the term is tested against its gradient in tests/test_training.py.
    assert FedProx(mu=0.1).configure(3, "hospital-0") == ClientSettings(proximal_mu=0.1)
    with pytest.raises(ValueError, match="mu"):
        FedProx(mu=-1.0)


def _ffa_lora() -> None:
    # Every round freezes A: only B and the head are trained and uploaded (a real run: tests/test_methods.py).
    assert {tuple(FFALoRA().configure(r, "c").uploaded(_adapter(0))) for r in (1, 2, 3)} == {
        ("layer.0.query.lora_B.weight", "classifier.weight")
    }


def _head_only() -> None:
    # Every round freezes both LoRA factors: only the head is trained and uploaded.
    assert {tuple(HeadOnly().configure(r, "c").uploaded(_adapter(0))) for r in (1, 2, 3)} == {("classifier.weight",)}
    with pytest.raises(ValueError, match="nothing would be trained"):  # a causal LM: no head, nothing to train
        HeadOnly().configure(1, "c").check({k: v for k, v in _adapter(0).items() if "lora" in k})


def _rolora() -> None:
    uploads = [tuple(RoLoRA().configure(r, "c").uploaded(_adapter(0))) for r in (1, 2, 3)]
    assert uploads == [
        ("layer.0.query.lora_B.weight", "classifier.weight"),  # B first: with B = 0, A's gradient is zero
        ("layer.0.query.lora_A.weight", "classifier.weight"),
        ("layer.0.query.lora_B.weight", "classifier.weight"),
    ]


def _fedsa_lora() -> None:
    # Clients keep B and the head, share A (a real run, personalised evaluation and resume: tests/test_methods.py).
    settings = FedSALoRA().configure(1, "c")
    assert tuple(settings.uploaded(_adapter(0))) == ("layer.0.query.lora_A.weight",)
    assert tuple(settings.kept(_adapter(0))) == ("layer.0.query.lora_B.weight", "classifier.weight")


def _clients(base: AdapterState) -> tuple[list[AdapterState], tuple[float, ...]]:
    """Three clients' updates from ``base`` with example weights 1, 1, 2; the third trained at rank 1 (its
    second component zero-padded, as fedtune/ranks.py uploads it)."""
    updates = [{k: v - base[k] for k, v in _adapter(20 + i).items()} for i in range(3)]
    updates[2][A][1], updates[2][B][:, 1] = -base[A][1], -base[B][:, 1]
    return updates, (1.0, 1.0, 2.0)


def _trained(base: AdapterState, updates: list[AdapterState], key: str) -> list[np.ndarray]:
    return [(base[key] + u[key]).double().numpy() for u in updates]


def _flexlora() -> None:
    base = _adapter(0)
    updates, weights = _clients(base)
    stepped = FlexLoRA().step(base, FlexLoRA().aggregate(_updates(updates, base, weights), 1), 1)
    shares = np.array(weights) / sum(weights)
    mean_product = sum(
        p * b @ a for p, b, a in zip(shares, _trained(base, updates, B), _trained(base, updates, A), strict=True)
    )
    u, s, vt = np.linalg.svd(mean_product)
    new_a, new_b = stepped[A].double().numpy(), stepped[B].double().numpy()
    assert np.allclose(new_b @ new_a, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)  # the best rank-2 approximation
    assert np.allclose(new_a @ new_a.T, np.eye(2), atol=1e-5)  # A = V_r^T, B = U_r S_r
    assert np.allclose(new_b[:, :1] @ new_a[:1], s[0] * np.outer(u[:, 0], vt[0]), atol=1e-5)  # rank-1 client
    head = sum(p * h for p, h in zip(shares, _trained(base, updates, HEAD), strict=True))
    assert np.allclose(stepped[HEAD].double().numpy(), head, atol=1e-6)


def _hetlora() -> None:
    base = _adapter(0)
    updates, weights = _clients(base)
    stepped = HetLoRA().step(base, HetLoRA().aggregate(_updates(updates, base, weights), 1), 1)
    products = [b @ a for b, a in zip(_trained(base, updates, B), _trained(base, updates, A), strict=True)]
    norms = np.array([np.linalg.norm(product, "fro") for product in products])
    for key in (A, B):
        expected = sum(n / norms.sum() * t for n, t in zip(norms, _trained(base, updates, key), strict=True))
        assert np.allclose(stepped[key].double().numpy(), expected, atol=1e-6)
    shares = np.array(weights) / sum(weights)  # the head: by examples, as FedAvg
    assert np.allclose(
        stepped[HEAD].double().numpy(),
        sum(p * h for p, h in zip(shares, _trained(base, updates, HEAD), strict=True)),
        atol=1e-6,
    )


def _fedex_lora() -> None:
    adapter, strategy = _adapter(0), FedExLoRA()
    residual = np.zeros((4, 3))
    for server_round in (1, 2):  # clients train on W + R: after each round, W + R + the mean of their products
        updates, weights = _clients(adapter)
        shares = np.array(weights) / sum(weights)
        products = [b @ a for b, a in zip(_trained(adapter, updates, B), _trained(adapter, updates, A), strict=True)]
        aggregate = strategy.aggregate(_updates(updates, adapter, weights), server_round)
        adapter = strategy.step(adapter, aggregate, server_round)
        expected = residual + sum(p * m for p, m in zip(shares, products, strict=True))
        assert np.allclose(_function(adapter)["layer.0.query"], expected, atol=1e-5)
        residual = adapter["layer.0.query" + RESIDUAL].double().numpy()
    assert adapter["layer.0.query" + RESIDUAL].shape == (4, 3)


HAND_COMPUTED: dict[str, Callable[[], None]] = {
    "fedavg": _fedavg,
    "fedavgm": _fedavgm,
    "fedadam": _fedadam,
    "fedyogi": _fedyogi,
    "fedadagrad": _fedadagrad,
    "fedprox": _fedprox,
    "ffa_lora": _ffa_lora,
    "head_only": _head_only,
    "rolora": _rolora,
    "fedsa_lora": _fedsa_lora,
    "flexlora": _flexlora,
    "hetlora": _hetlora,
    "fedex_lora": _fedex_lora,
    **ROBUST_HAND_COMPUTED,
}


def test_every_strategy_has_a_hand_computed_test() -> None:
    assert sorted(HAND_COMPUTED) == NAMES, "add a hand-computed test for each conf/strategy/*.yaml to HAND_COMPUTED"


@pytest.mark.parametrize("name", sorted(HAND_COMPUTED))
def test_strategy_matches_its_hand_computation(name: str) -> None:
    HAND_COMPUTED[name]()


def test_methods_that_change_only_clients_take_any_server_strategy() -> None:
    cfg = config.compose(["strategy=ffa_lora", "strategy@strategy.server=fedadam", "strategy.server.eta=0.02"])
    strategy = config.instantiate(cfg.strategy)
    assert isinstance(strategy.server, FedAdam) and strategy.server.eta == 0.02
    assert strategy.configure(1, "c").frozen == ("lora_A",)


class _StrategyWithoutMinClients:
    """A user's strategy written before ``min_clients`` joined the protocol."""

    linear, weighting, folds_residuals = True, "examples", False

    def __init__(self, **settings: object) -> None:  # takes strategy=fedavg's settings
        pass


def test_a_strategy_missing_a_protocol_attribute_is_named() -> None:
    cfg = config.compose(["strategy._target_=tests.test_strategies._StrategyWithoutMinClients"])
    with pytest.raises(TypeError, match="lacks min_clients of the Strategy protocol"):
        Experiment(cfg).check_composition()
