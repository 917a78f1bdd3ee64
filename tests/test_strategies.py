"""The strategy contract, run over every strategy, and FedAvg against a hand computation."""

from __future__ import annotations

import pytest
import torch

from fedtune import config
from strategies.fedavg import FedAvg

# Add a row per strategy: (name of conf/strategy/<name>.yaml, factory).
STRATEGIES = [("fedavg", FedAvg)]


def _updates(seed: int, count: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"a": torch.randn(3, 4, generator=generator), "b": torch.randn(5, generator=generator)} for _ in range(count)
    ]


@pytest.mark.parametrize("name, factory", STRATEGIES)
def test_config_builds_the_strategy(name: str, factory: type) -> None:
    assert isinstance(config.instantiate(config.compose([f"strategy={name}"]).strategy), factory)


@pytest.mark.parametrize("name, factory", STRATEGIES)
def test_identical_updates_aggregate_to_themselves(name: str, factory: type) -> None:
    update = _updates(0, 1)[0]
    result = factory().aggregate([update, update, update], [1.0, 5.0, 2.0])
    assert all(torch.allclose(result[k], update[k], atol=1e-6) for k in update)


@pytest.mark.parametrize("name, factory", STRATEGIES)
def test_linear_strategies_compute_the_weighted_mean(name: str, factory: type) -> None:
    strategy = factory()
    if not strategy.linear:
        pytest.skip("non-linear strategies make no weighted-mean promise")
    updates, weights = _updates(1, 4), [10.0, 1.0, 3.0, 6.0]
    result = strategy.aggregate(updates, weights)
    for key in updates[0]:
        expected = sum(w * u[key].double() for u, w in zip(updates, weights, strict=True)) / sum(weights)
        assert torch.allclose(result[key].double(), expected, atol=1e-6)


@pytest.mark.parametrize("name, factory", STRATEGIES)
def test_state_round_trips(name: str, factory: type) -> None:
    strategy = factory()
    restored = factory()
    restored.load_state_dict(strategy.state_dict())
    assert restored.state_dict() == strategy.state_dict()


def test_fedavg_matches_a_hand_computed_example() -> None:
    updates = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, -2.0])}]
    mean = FedAvg().aggregate(updates, [30, 10])  # (30*[1,2] + 10*[3,-2]) / 40 = [1.5, 1.0]
    assert mean["w"].tolist() == [1.5, 1.0]
    stepped = FedAvg(server_lr=0.5).step({"w": torch.tensor([10.0, 10.0])}, mean)
    assert stepped["w"].tolist() == [10.75, 10.5]


def test_fedavg_refuses_mismatched_weights() -> None:
    with pytest.raises(ValueError, match="one weight per update"):
        FedAvg().aggregate(_updates(0, 2), [1.0])
    with pytest.raises(ValueError, match="server_lr"):
        FedAvg(server_lr=0)
