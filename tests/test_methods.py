"""Federated methods in real rounds: the real server loop and ClientApps, in-process (tests/nodes.py).

Each test runs what a user runs with ``fedtune run strategy=...`` and checks the method's defining property
in what the server ends with: a frozen factor that never moves, an upload that halves, a proximal term that
holds clients back, optimizer state that survives a crash, and refusals that no launch path can skip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedtune import adapters, client_state, config
from fedtune.adapters import AdapterState
from fedtune.aggregation import RoundUpdates
from fedtune.experiment import get_experiment
from fedtune.run_dir import RunDir
from fedtune.server_app import RoundFailedError
from strategies.median import CoordinateMedian
from tests.conftest import tiny_overrides
from tests.nodes import federate


def _federate(root: Path, overrides: list[str], count: int, **options: Any) -> RunDir:
    return RunDir(federate(root, overrides, count, **options))


def _adapter_after(run: RunDir, server_round: int) -> AdapterState:
    return torch.load(run.checkpoints / f"round-{server_round:04d}.pt", weights_only=True)["adapter"]


def _train_metric(run: RunDir, name: str) -> dict[int, float]:
    return {m["round"]: m["value"] for m in run.read_metrics() if m["scope"] == "train" and m["metric"] == name}


def _of(adapter: AdapterState, fragment: str) -> AdapterState:
    return {k: v for k, v in adapter.items() if fragment in k}


def _equal(a: AdapterState, b: AdapterState) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("strategy", "frozen"), [("ffa_lora", ("lora_A",)), ("head_only", ("lora_A", "lora_B"))])
def test_frozen_factors_under_masking_and_dp_sgd_never_move_and_are_not_uploaded(
    tiny_bert_dir: Path, tmp_path: Path, strategy: str, frozen: tuple[str, ...]
) -> None:
    """FFA-LoRA freezes A, head-only training both factors: they stay at the shared initialisation, what is
    trained moves, and the masked upload is smaller than FedAvg's by exactly the frozen values."""
    masked = ("federation.num_clients=3", "secure=masking")
    method = _federate(
        tmp_path / strategy,
        tiny_overrides(tiny_bert_dir, tmp_path / strategy / "run", *masked, f"strategy={strategy}", "privacy=dp_sgd"),
        3,
    )
    fedavg_overrides = tiny_overrides(tiny_bert_dir, tmp_path / "fedavg" / "run", *masked)
    fedavg = _federate(tmp_path / "fedavg", fedavg_overrides, 3)
    initial = get_experiment(config.compose(fedavg_overrides)).initial_adapter()
    final = _adapter_after(method, 2)
    for fragment in frozen:
        assert _equal(_of(final, fragment), _of(initial, fragment))  # at the shared initialisation
    trained = "lora_B" if strategy == "ffa_lora" else "classifier"
    assert not _equal(_of(final, trained), _of(initial, trained))
    # A masked upload is one uint32 per uploaded value: the frozen values are what is not sent.
    saved = sum(adapters.num_parameters(_of(initial, fragment)) for fragment in frozen) * 4
    uploads = (_train_metric(run, "upload_bytes_per_client")[1] for run in (fedavg, method))
    assert abs(next(uploads) - next(uploads) - saved) < 0.02 * saved


def test_rolora_trains_b_in_odd_rounds_and_a_in_even_ones(tiny_bert_dir: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", "strategy=rolora", "federation.num_clients=3")
    run = _federate(tmp_path, overrides, 3)
    initial = get_experiment(config.compose(overrides)).initial_adapter()
    first, second = _adapter_after(run, 1), _adapter_after(run, 2)
    assert _equal(_of(first, "lora_A"), _of(initial, "lora_A")) and not _equal(
        _of(first, "lora_B"), _of(initial, "lora_B")
    )
    assert _equal(_of(second, "lora_B"), _of(first, "lora_B")) and not _equal(
        _of(second, "lora_A"), _of(first, "lora_A")
    )
    assert not _equal(_of(second, "classifier"), _of(first, "classifier"))  # the head trains every round


def test_fedprox_keeps_client_updates_closer_to_the_global_adapter(tiny_bert_dir: Path, tmp_path: Path) -> None:
    norms = {}
    for mu in (0.0, 50.0):
        root = tmp_path / f"mu-{mu}"
        extra = ("strategy=fedprox", f"strategy.mu={mu}", "federation.num_rounds=1", "train.local_steps=6")
        run = _federate(root, tiny_overrides(tiny_bert_dir, root / "run", *extra), 2)
        norms[mu] = {
            m["scope"]: m["value"]
            for m in run.read_metrics()
            if m["metric"] == "update_norm" and m["scope"].startswith("client:")
        }
    assert norms[0.0].keys() == norms[50.0].keys() and len(norms[0.0]) == 2
    assert all(norms[50.0][client] < 0.7 * norms[0.0][client] for client in norms[0.0])


@pytest.mark.parametrize("strategy", ["fedadam", "fedex_lora"])
def test_server_state_survives_a_crash_and_the_resumed_run_is_bit_identical(
    tiny_bert_dir: Path, tmp_path: Path, strategy: str
) -> None:
    """FedAdam's moments live in the strategy's state, FedEx-LoRA's residuals in the global adapter: both are
    in every checkpoint."""
    extra = (f"strategy={strategy}", "federation.num_rounds=3")
    uninterrupted = _federate(tmp_path / "a", tiny_overrides(tiny_bert_dir, tmp_path / "a" / "run", *extra), 2)
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "b" / "run", *extra)
    with pytest.raises(RoundFailedError):  # one of the two clients is lost in round 3: the round fails
        _federate(tmp_path / "b", overrides, 2, failures={"hospital-1": [(3, "train")]})
    resumed = _federate(tmp_path / "b", [*overrides, "resume=true"], 2)
    assert _equal(_adapter_after(resumed, 3), _adapter_after(uninterrupted, 3))
    assert not _equal(_adapter_after(resumed, 3), _adapter_after(resumed, 2))


def _personal(root: Path, overrides: list[str], name: str) -> AdapterState:
    """What node ``name`` (of tests/nodes.py, under ``root``) keeps for itself after the last round."""
    experiment = get_experiment(config.compose(overrides))
    node_config = {"state-dir": str(root / "state" / name)}
    path = client_state.personal_file(node_config, f"{experiment.hash}|{experiment.cfg.run_dir}", name)
    return client_state.load_personal(path, experiment.federation.num_rounds + 1)


def test_fedsa_lora_shares_a_keeps_b_and_the_head_on_each_client_and_evaluates_them(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    overrides = tiny_overrides(
        tiny_bert_dir, tmp_path / "run", "strategy=fedsa_lora", "secure=masking", "federation.num_clients=3"
    )
    run = _federate(tmp_path, overrides, 3)
    experiment = get_experiment(config.compose(overrides))
    initial, final = experiment.initial_adapter(), _adapter_after(run, 2)
    shared = {k: v for k, v in final.items() if "lora_A" in k}
    assert _equal(
        {k: v for k, v in final.items() if k not in shared}, {k: v for k, v in initial.items() if k not in shared}
    )
    assert not _equal(shared, _of(initial, "lora_A"))
    kept = [_personal(tmp_path, overrides, f"hospital-{i}") for i in range(3)]
    assert all(set(k) == set(final) - set(shared) for k in kept)
    assert not _equal(kept[0], kept[1]) and not _equal(kept[0], {k: initial[k] for k in kept[0]})
    # The federated metric is personalised: each client's own B and head with the shared A, on its own split.
    accuracy = [experiment.evaluate({**final, **kept[i]}, experiment.client_data(i).val)["accuracy"] for i in range(3)]
    federated = {
        m["round"]: m["value"] for m in run.read_metrics() if (m["scope"], m["metric"]) == ("federated", "accuracy")
    }
    assert federated[2] == pytest.approx(sum(accuracy) / 3, abs=1e-9)  # masked: clients count equally
    assert "personalised" in (run.path / "README.md").read_text()


def test_what_fedsa_lora_clients_keep_survives_a_crash_and_the_resumed_run_is_bit_identical(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    extra = ("strategy=fedsa_lora", "federation.num_rounds=3")
    a = tiny_overrides(tiny_bert_dir, tmp_path / "a" / "run", *extra)
    uninterrupted = _federate(tmp_path / "a", a, 2)
    b = tiny_overrides(tiny_bert_dir, tmp_path / "b" / "run", *extra)
    with pytest.raises(RoundFailedError):  # hospital-0 trains round 3 (and keeps its tensors), hospital-1 is lost
        _federate(tmp_path / "b", b, 2, failures={"hospital-1": [(3, "train")]})
    resumed = _federate(tmp_path / "b", [*b, "resume=true"], 2)
    assert _equal(_adapter_after(resumed, 3), _adapter_after(uninterrupted, 3))
    for name in ("hospital-0", "hospital-1"):
        assert _equal(_personal(tmp_path / "b", b, name), _personal(tmp_path / "a", a, name))


class RecordingMedian(CoordinateMedian):
    """strategies/median.py, keeping what the server hands it (any round size: no bad update is tolerated)."""

    seen: list[RoundUpdates] = []

    def __init__(self, server_lr: float = 1.0) -> None:
        super().__init__(byzantine=0, server_lr=server_lr)

    def aggregate(self, updates: RoundUpdates, server_round: int) -> AdapterState:
        RecordingMedian.seen.append(updates)
        return super().aggregate(updates, server_round)


MEDIAN = "strategy._target_=tests.test_methods.RecordingMedian"


def test_a_non_linear_strategy_gets_each_update_in_the_clear(tiny_bert_dir: Path, tmp_path: Path) -> None:
    RecordingMedian.seen.clear()
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", MEDIAN, "federation.num_clients=3")
    run = _federate(tmp_path, overrides, 3)
    first = RecordingMedian.seen[0]
    assert first.contributors == 3 and first.weights == (1.0, 1.0, 1.0)  # it declared uniform weights
    for key, mean in first.mean.items():
        assert torch.allclose(mean, sum(u[key] for u in first.individual) / 3, atol=1e-7)
    median = {k: torch.stack([u[k] for u in first.individual]).median(dim=0).values for k in first.mean}
    initial = get_experiment(config.compose(overrides)).initial_adapter()
    assert _equal(_adapter_after(run, 1), adapters.apply(initial, median))


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (("secure=masking",), "needs every client's individual update"),
        (("privacy=client_dp",), "calibrates its noise to the sensitivity of a mean"),
    ],
)
def test_the_server_itself_refuses_a_non_linear_strategy_where_only_a_mean_is_possible(
    tiny_bert_dir: Path, tmp_path: Path, extra: tuple[str, ...], reason: str
) -> None:
    """The refusal runs in the server loop, so `flwr run` and deployments get it, and it writes nothing."""
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", MEDIAN, "federation.num_clients=3", *extra)
    with pytest.raises(ValueError, match=reason):
        _federate(tmp_path, overrides, 3)
    assert not (tmp_path / "run").exists()
