"""Clients of different LoRA ranks, and exact aggregation with a dense residual (FedEx-LoRA), in real models
and real rounds (the server loop and ClientApps in-process, tests/nodes.py).

The properties: a client of a smaller rank computes the truncation of the global adapter; it uploads its
factors zero-padded, so FlexLoRA, HetLoRA and (under masking) FedAvg all get one layout; FedEx-LoRA's global
model computes exactly the mean of the clients' products, and its export loads back into that model.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from fedtune import adapters, client, config, ranks
from fedtune.adapters import RESIDUAL, RESIDUAL_FILE, AdapterState
from fedtune.aggregation import RoundUpdates
from fedtune.experiment import Experiment, get_experiment
from fedtune.run_dir import RunDir
from strategies.fedex_lora import FedExLoRA
from strategies.flexlora import FlexLoRA
from tests.conftest import tiny_overrides
from tests.nodes import federate

TEXTS = ["Type 2 diabetes mellitus with hyperglycemia", "Fracture of the left femur", "Acute bronchitis"]


class RecordingFlexLoRA(FlexLoRA):
    """FlexLoRA that keeps what the server handed it (the test reads the clients' uploads from it)."""

    seen: ClassVar[list[RoundUpdates]] = []

    def aggregate(self, updates: RoundUpdates, server_round: int) -> AdapterState:
        RecordingFlexLoRA.seen.append(updates)
        return super().aggregate(updates, server_round)


class RecordingFedExLoRA(FedExLoRA):
    """FedEx-LoRA that keeps what the server handed it."""

    seen: ClassVar[list[RoundUpdates]] = []

    def aggregate(self, updates: RoundUpdates, server_round: int) -> AdapterState:
        RecordingFedExLoRA.seen.append(updates)
        return super().aggregate(updates, server_round)


def _logits(experiment: Experiment, adapter: AdapterState, rank: int | None = None) -> torch.Tensor:
    model = experiment.model(rank)
    adapters.set_adapter(model, adapter)
    batch = experiment.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def _random_adapter(experiment: Experiment, seed: int) -> AdapterState:
    """The initial adapter with every tensor drawn at random (B is zero at initialisation)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=generator) * 0.2 for k, v in experiment.initial_adapter().items()}


def _checkpoint(run: Path, server_round: int) -> AdapterState:
    return torch.load(RunDir(run).checkpoints / f"round-{server_round:04d}.pt", weights_only=True)["adapter"]


def test_pad_and_truncate_keep_the_first_components_and_zero_the_rest() -> None:
    generator = torch.Generator().manual_seed(0)
    full = {
        "m.lora_A.weight": torch.randn(4, 3, generator=generator),
        "m.lora_B.weight": torch.randn(5, 4, generator=generator),
    }
    small = ranks.truncate(full, 2)
    assert small["m.lora_A.weight"].shape == (2, 3) and small["m.lora_B.weight"].shape == (5, 2)
    padded = ranks.pad(small, full)
    assert torch.equal(padded["m.lora_A.weight"][:2], full["m.lora_A.weight"][:2])
    assert not padded["m.lora_A.weight"][2:].any() and not padded["m.lora_B.weight"][:, 2:].any()
    assert ranks.rank_of(full) == 4 and ranks.rank_of(small) == 2
    with pytest.raises(ValueError, match="cannot truncate"):
        ranks.truncate(small, 3)


def test_a_client_of_a_smaller_rank_computes_the_truncation_of_the_global_adapter(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """Its lora_alpha is scaled with its rank, so PEFT's alpha / r matches the global adapter's."""
    experiment = Experiment(config.compose(tiny_overrides(tiny_bert_dir, tmp_path / "run", "lora.r=4")))
    global_adapter = _random_adapter(experiment, 1)
    zeroed = ranks.pad(ranks.truncate(global_adapter, 2), global_adapter)  # components 2 and 3 removed
    expected = _logits(experiment, zeroed)
    assert torch.allclose(_logits(experiment, ranks.truncate(global_adapter, 2), rank=2), expected, atol=1e-5)
    assert not torch.allclose(_logits(experiment, global_adapter), expected, atol=1e-3)  # the truncation matters
    with pytest.raises(ValueError, match="between 1 and lora.r=4"):
        experiment.lora_rank(5)


def test_flexlora_with_client_ranks_gets_zero_padded_uploads_and_the_svd_of_the_mean_product(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    RecordingFlexLoRA.seen.clear()
    overrides = tiny_overrides(
        tiny_bert_dir,
        tmp_path / "run",
        "strategy=flexlora",
        f"strategy._target_={__name__}.RecordingFlexLoRA",
        "lora.r=4",
        "federation.num_clients=3",
        "federation.client_ranks=[2,4,4]",
        "federation.num_rounds=1",
    )
    run = federate(tmp_path, overrides, 3)
    first = RecordingFlexLoRA.seen[0]
    pairs = ranks.lora_pairs(first.base)

    def trained(update: AdapterState, key: str) -> torch.Tensor:
        return first.base[key] + update[key]

    padded = [
        all(not trained(u, a)[2:].any() and not trained(u, b)[:, 2:].any() for a, b in pairs.values())
        for u in first.individual
    ]
    assert sorted(padded) == [False, False, True]  # the rank-2 client, and only it, sent padded factors
    assert (
        "federation.client_ranks=[2, 4, 4]" in (run / "README.md").read_text()
    )  # the model card says who trained at what
    final, shares = _checkpoint(run, 1), np.array(first.weights) / sum(first.weights)
    for a, b in pairs.values():
        mean = sum(
            p * trained(u, b).double().numpy() @ trained(u, a).double().numpy()
            for u, p in zip(first.individual, shares, strict=True)
        )
        left, singular, right = np.linalg.svd(mean)
        best = (left[:, :4] * singular[:4]) @ right[:4]
        assert np.allclose(final[b].double().numpy() @ final[a].double().numpy(), best, atol=1e-5)


def test_fedavg_with_client_ranks_runs_under_masking_and_gives_the_plaintext_mean(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    common = ("lora.r=4", "federation.num_clients=3", "federation.client_ranks=[2,4,4]", "federation.num_rounds=1")
    results = {}
    for secure in ("none", "masking"):
        overrides = tiny_overrides(tiny_bert_dir, tmp_path / secure / "run", *common, f"secure={secure}")
        results[secure] = _checkpoint(federate(tmp_path / secure, overrides, 3), 1)
    initial = get_experiment(config.compose(overrides)).initial_adapter()
    assert not adapters.fingerprint(results["none"]) == adapters.fingerprint(initial)
    for key, value in results["none"].items():  # equal up to the masked sum's fixed-point encoding
        assert torch.allclose(results["masking"][key], value, atol=1e-5), key


def _fedex_run(tiny_bert_dir: Path, tmp_path: Path, *extra: str) -> tuple[Path, list[str]]:
    RecordingFedExLoRA.seen.clear()
    overrides = tiny_overrides(
        tiny_bert_dir,
        tmp_path / "run",
        "strategy=fedex_lora",
        f"strategy._target_={__name__}.RecordingFedExLoRA",
        "federation.num_clients=3",
        "train.lr=0.05",  # updates large enough that mean(B_i A_i) and mean(B) mean(A) differ clearly
        *extra,
    )
    return federate(tmp_path, overrides, 3), overrides


@pytest.mark.parametrize(
    "extra",
    [(), ("lora.r=4", "federation.client_ranks=[2,4,4]"), ("privacy=dp_sgd",)],
    ids=["equal-ranks", "client-ranks", "dp-sgd"],
)
def test_fedex_lora_makes_the_global_model_the_mean_of_the_clients_products(
    tiny_bert_dir: Path, tmp_path: Path, extra: tuple[str, ...]
) -> None:
    """Exact whatever the clients' ranks (their padded factors multiply to their own products) and under
    DP-SGD (which clips and noises inside each client; the residual is formed from what they upload)."""
    run, overrides = _fedex_run(tiny_bert_dir, tmp_path, *extra)
    experiment = get_experiment(config.compose(overrides))
    residual: dict[str, Any] = {}
    for server_round, updates in enumerate(RecordingFedExLoRA.seen, start=1):
        final, shares = _checkpoint(run, server_round), np.array(updates.weights) / sum(updates.weights)
        for module, (a, b) in ranks.lora_pairs(updates.base).items():
            products = [
                (updates.base[b] + u[b]).double().numpy() @ (updates.base[a] + u[a]).double().numpy()
                for u in updates.individual
            ]
            expected = residual.get(module, 0.0) + sum(p * m for p, m in zip(shares, products, strict=True))
            got = final[module + RESIDUAL].double().numpy() + final[b].double().numpy() @ final[a].double().numpy()
            assert np.allclose(got, expected, atol=1e-5)
            naive = final[b].double().numpy() @ final[a].double().numpy()
            assert not np.allclose(naive, expected, atol=1e-5)  # FedAvg of the factors alone is not exact
            residual[module] = final[module + RESIDUAL].double().numpy()
    # the residual reached the model: logits differ from the same factors without it, and go back without it
    final = _checkpoint(run, 2)
    factors_only = {k: v for k, v in final.items() if not adapters.is_residual(k)}
    before = _logits(experiment, factors_only)
    assert not torch.allclose(_logits(experiment, final), before, atol=1e-4)
    assert torch.equal(_logits(experiment, factors_only), before)


def test_fedex_lora_export_loads_back_into_the_servers_model(tiny_bert_dir: Path, tmp_path: Path) -> None:
    run, overrides = _fedex_run(tiny_bert_dir, tmp_path)
    experiment = get_experiment(config.compose(overrides))
    server = _logits(experiment, _checkpoint(run, 2))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=experiment.num_labels)
    base.config.pad_token_id = experiment.tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, run / "adapter").eval()
    for name, delta in load_file(run / "adapter" / RESIDUAL_FILE).items():  # as the model card says
        weight = model.get_parameter(name)
        weight.data += delta.to(weight.device, weight.dtype)
    batch = experiment.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, server, atol=1e-5)
    assert RESIDUAL_FILE in (run / "README.md").read_text()


def test_a_client_trains_from_the_servers_model_with_the_residual_folded_in(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    """The residual must reach the clients' models too, at every rank, or they would train from another model
    than the one the server holds: after a round-2 ``train_round`` the client's frozen weights are the
    pretrained ones (read afresh from disk) plus ``s R``."""
    run, overrides = _fedex_run(tiny_bert_dir, tmp_path, "lora.r=4", "federation.client_ranks=[2,4,4]")
    experiment = get_experiment(config.compose(overrides))
    global_adapter = _checkpoint(run, 1)
    pretrained = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=experiment.num_labels)
    residuals = {k: v for k, v in global_adapter.items() if adapters.is_residual(k)}
    assert residuals
    for rank in (2, 4):
        client.train_round(experiment, experiment.client_data(0), global_adapter, 2, "hospital-0", {}, rank=rank)
        model = experiment.model(rank)
        for key, residual in residuals.items():
            module = model.get_submodule(key.removesuffix(RESIDUAL))
            name = key.removesuffix(RESIDUAL).removeprefix("base_model.model.") + ".weight"
            expected = pretrained.get_parameter(name) + module.scaling["default"] * residual
            assert torch.allclose(module.base_layer.weight, expected, atol=1e-6), (rank, key)


def test_a_residual_on_a_layer_that_stores_its_weight_fan_in_first_is_transposed() -> None:
    """GPT-2's Conv1D keeps W as (in, out) and PEFT's LoRA on it runs with ``fan_in_fan_out``; a residual is
    (out, in), as ``B A`` is. The folded layer must compute ``x W + b + s x R^T``."""
    torch.manual_seed(0)
    model = get_peft_model(_Conv1DNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["layer"], fan_in_fan_out=True))
    adapter = adapters.get_adapter(model)
    (module_name,) = ranks.lora_pairs(adapter)
    residual = torch.randn(5, 3)
    x = torch.randn(2, 3)
    with torch.no_grad():
        before = model(x)
        adapters.set_adapter(model, {**adapter, module_name + RESIDUAL: residual})
        assert torch.allclose(model(x), before + 2.0 * x @ residual.T, atol=1e-6)  # s = alpha / r = 2
        weight_delta = adapters.residual_weights(model, {**adapter, module_name + RESIDUAL: residual})
        assert torch.equal(next(iter(weight_delta.values())), 2.0 * residual.T)
        adapters.set_adapter(model, adapter)  # without the residual: the layer is the base one again
        assert torch.allclose(model(x), before, atol=1e-6)


class _Conv1DNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = Conv1D(nf=5, nx=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_a_malformed_residual_changes_nothing() -> None:
    """Validated before any weight is written: a bad residual key or shape leaves the model as it was."""
    torch.manual_seed(0)
    model = get_peft_model(_Conv1DNet(), LoraConfig(r=2, target_modules=["layer"], fan_in_fan_out=True))
    adapter = adapters.get_adapter(model)
    (module_name,) = ranks.lora_pairs(adapter)
    weight = model.get_submodule(module_name).base_layer.weight.detach().clone()
    good = {module_name + RESIDUAL: torch.ones(5, 3)}
    for bad in ({"base_model.model.nothing" + RESIDUAL: torch.ones(5, 3)}, {module_name + RESIDUAL: torch.ones(3, 5)}):
        with pytest.raises(ValueError, match="Residual"):
            adapters.set_adapter(model, {**adapter, **good, **bad})
        assert torch.equal(model.get_submodule(module_name).base_layer.weight, weight)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["federation.client_ranks=[2,8]"],
            "federation.client_ranks: a client rank of 8, but client ranks lie between",
        ),
        (["federation.client_ranks=[2]"], "one rank >= 1 per client"),
        (["federation.client_ranks=[2,4]", "privacy=client_dp"], "below lora.r=4 with organisation-level DP"),
        (["federation.client_ranks=[2,4]", "+lora.rank_pattern={query:2}"], "lora.rank_pattern"),
        (["strategy=fedex_lora", "train.precision=bf16"], "Set train.precision=fp32"),
        (["strategy=fedex_lora", "lora.use_dora=true"], "Set lora.use_dora=false"),
    ],
)
def test_ranks_and_residuals_that_cannot_work_are_refused_at_start_with_the_key(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):  # ConfigError, a ValueError, from compose or the check
        Experiment(config.compose(["lora.r=4", "federation.num_clients=2", *overrides])).check_composition()


def test_a_deployed_node_of_a_smaller_rank_refuses_organisation_level_dp() -> None:
    """A node's own ``lora-rank`` is checked where the node starts, not only the simulated ranks."""
    experiment = Experiment(config.compose(["lora.r=4", "privacy=client_dp"]))
    assert experiment.lora_rank(4) == 4
    with pytest.raises(ValueError, match="node config lora-rank: a client rank of 2 below lora.r=4"):
        experiment.lora_rank(2)
