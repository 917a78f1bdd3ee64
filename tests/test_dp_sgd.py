"""DP-SGD: per-record clipping, noise scale, accounting across rounds, budget and refusals.

Every property is checked against an independent computation: a per-example autograd loop for
clipping, the Gaussian's standard deviation for noise, and Opacus's RDP analysis functions (not the
accountant object fedtune drives) for epsilon.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from peft import LoraConfig

from fedtune import adapters, config, devices
from fedtune.models import ModelSpec, build_model, load_tokenizer
from fedtune.privacy import NoPrivacy, PlanRequest
from fedtune.privacy.dp_sgd import DPSGD, STATE_KEY, PrivacyBudgetExhaustedError, poisson_batches
from fedtune.tasks import Task
from fedtune.training import TrainConfig, add_proximal_term, encode, local_train, sequence_loss

ROWS = datasets.Dataset.from_dict(
    {"text": [f"patient {i} has symptom {i % 7}" for i in range(40)], "label": [i % 3 for i in range(40)]}
)
# Plain-text documents of many lengths (padding differs per batch), some longer than the 32 tokens kept
DOCUMENTS = datasets.Dataset.from_dict(
    {"text": [f"patient {i} reports " + "fever and a dry cough, " * (i % 9) + "no rash." for i in range(40)]}
)


@pytest.fixture
def model_and_tokenizer(tiny_bert_dir: Path, request: pytest.FixtureRequest):  # noqa: ANN201
    """The tiny classifier (pooling ``cls``, or the test's indirect parameter)."""
    spec = ModelSpec(str(tiny_bert_dir), "classification", 32, pooling=getattr(request, "param", "cls"))
    model, initial = build_model(spec, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), num_labels=3, seed=0)
    adapters.set_adapter(model, initial)  # random LoRA B as well, so every adapter tensor has a gradient
    return model, load_tokenizer(spec)


def _one_step_gradient(
    model,  # noqa: ANN001
    tokenizer,  # noqa: ANN001
    mechanism: DPSGD,
    indices: list[int],
    seed: int = 0,
    precision: str = "fp32",
    physical: int | None = None,
    rows: datasets.Dataset = ROWS,
    task: Task = "classification",
) -> dict[str, torch.Tensor]:
    """The gradient the DP optimizer hands to the inner optimizer for a batch of ``indices`` of ``rows`` (in
    physical batches of ``physical`` records, each but the last accumulated, as the training loop does)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # flat turns requires_grad off
    optimizer = torch.optim.SGD([p for _, p in named], lr=0.0)
    plan = mechanism.plan(PlanRequest(model, optimizer, len(rows), 8, 1, 1, torch.Generator().manual_seed(seed), {}))
    model.train()  # Opacus records activations in training mode only
    try:
        size = physical or max(1, len(indices))
        chunks = [indices[i : i + size] for i in range(0, len(indices), size)]
        for number, chunk in enumerate(chunks):
            batch = encode(rows[chunk], task, tokenizer, 32)
            labels, input_ids = batch.pop("labels"), batch.pop("input_ids")
            with devices.autocast(input_ids.device, precision):
                losses = sequence_loss(plan.module(input_ids, **batch).logits, labels, task)
            plan.backward(losses, len(chunk) / len(indices))
            if number < len(chunks) - 1:
                plan.accumulate()
        plan.optimizer.pre_step()
        return {n: p.grad.detach().clone() for n, p in named}
    finally:
        plan.optimizer.zero_grad(set_to_none=True)
        plan.close()
        model.eval()


@pytest.mark.parametrize("model_and_tokenizer", ["cls", "mean"], indirect=True)  # a mean stays within its record
@pytest.mark.parametrize("mode", ["flat", "hooks", "functorch", "ew", "ghost"])
def test_each_record_gradient_is_clipped_as_a_per_example_loop_computes(model_and_tokenizer, mode: str) -> None:  # noqa: ANN001
    model, tokenizer = model_and_tokenizer
    clip, indices = 0.01, [0, 5, 11, 17, 23, 31]
    mechanism = DPSGD(target_epsilon=None, noise_multiplier=1e-12, max_grad_norm=clip, grad_sample_mode=mode)  # type: ignore[arg-type]
    dp = _one_step_gradient(model, tokenizer, mechanism, indices)
    _assert_clipped_per_record(dp, model, tokenizer, ROWS, "classification", indices, clip)


def _assert_clipped_per_record(
    dp: dict[str, torch.Tensor],
    model,  # noqa: ANN001
    tokenizer,  # noqa: ANN001
    rows: datasets.Dataset,
    task: Task,
    indices: list[int],
    clip: float,
) -> None:
    """``dp`` (a DP step's gradient, noise negligible) equals an independent reference: one backward per record
    of ``rows``, encoded alone (no padding), its gradient clipped to ``clip``, summed over the records."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    reference = {n: torch.zeros_like(p) for n, p in named}
    model.train()  # as during DP training (the tiny models have no dropout, so this is deterministic)
    for i in indices:
        model.zero_grad()
        batch = encode(rows[[i]], task, tokenizer, 32)
        labels = batch.pop("labels")
        sequence_loss(model(**batch).logits, labels, task).sum().backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for _, p in named))
        assert norm > clip  # every record is actually clipped at this bound
        factor = min(1.0, clip / (float(norm) + 1e-6))
        assert math.isclose(norm * factor, clip, rel_tol=1e-4)  # the clipped record's norm is the bound
        for n, p in named:
            reference[n] += p.grad * factor
    model.zero_grad()
    model.eval()
    expected_batch = 8 / len(rows) * len(rows)  # the optimizer divides by the expected Poisson batch size
    for n, _ in named:
        assert torch.allclose(dp[n], reference[n] / expected_batch, atol=1e-7, rtol=1e-4), n


@pytest.mark.parametrize("mode", ["flat", "hooks", "ghost"])
def test_each_plain_text_document_is_clipped_as_one_record(tiny_llama_dir: Path, mode: str) -> None:
    """A causal LM continuing documents: each document, padded in the batch and cut to 32 tokens, is one record
    whose gradient (of its mean loss over all its tokens) is clipped alone."""
    spec = ModelSpec(str(tiny_llama_dir), "plain_text", 32)
    model, initial = build_model(spec, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), None, seed=0)
    adapters.set_adapter(model, initial)
    tokenizer, clip, indices = load_tokenizer(spec), 0.01, [0, 1, 3, 5, 11, 17]
    lengths = [len(ids) for ids in tokenizer(DOCUMENTS[indices]["text"], add_special_tokens=False)["input_ids"]]
    assert len(set(lengths)) > 3 and max(lengths) > 32  # padding differs per record, one is cut
    mechanism = DPSGD(target_epsilon=None, noise_multiplier=1e-12, max_grad_norm=clip, grad_sample_mode=mode)  # type: ignore[arg-type]
    dp = _one_step_gradient(model, tokenizer, mechanism, indices, rows=DOCUMENTS, task="plain_text")
    _assert_clipped_per_record(dp, model, tokenizer, DOCUMENTS, "plain_text", indices, clip)


@pytest.mark.parametrize("mode", ["flat", "hooks", "functorch", "ew", "ghost"])
def test_a_batch_in_physical_batches_gives_the_step_of_the_whole_batch(model_and_tokenizer, mode: str) -> None:  # noqa: ANN001
    """Large logical batches in bounded memory: split into passes of 2 and 3 records (sizes that differ, as
    Poisson batches' last pass does), every record is still clipped alone and the clipped sums add up to
    the whole batch's; the noise is drawn once (checked with a noise multiplier near 0, and in
    test_dp_training_in_physical_batches_matches_the_whole_batch_bit_for_bit_of_noise)."""
    model, tokenizer = model_and_tokenizer
    mechanism = DPSGD(target_epsilon=None, noise_multiplier=1e-12, max_grad_norm=0.01, grad_sample_mode=mode)  # type: ignore[arg-type]
    indices = [0, 5, 11, 17, 23, 31, 37]
    whole = _one_step_gradient(model, tokenizer, mechanism, indices)
    for physical in (2, 3):
        split = _one_step_gradient(model, tokenizer, mechanism, indices, physical=physical)
        for name, gradient in whole.items():
            assert torch.allclose(split[name], gradient, atol=1e-8, rtol=1e-4), (physical, name)


@pytest.mark.parametrize("mode", ["flat", "hooks", "ghost"])
def test_dp_training_in_physical_batches_matches_the_whole_batch_bit_for_bit_of_noise(
    model_and_tokenizer,  # noqa: ANN001
    mode: str,
) -> None:
    """With reproducible noise, a run whose steps are split into passes of 3 draws the same noise, takes the
    same steps and accounts the same epsilon as the unsplit run: one noise draw and one accounted step per
    logical batch, not per pass."""
    model, tokenizer = model_and_tokenizer
    initial = adapters.get_adapter(model)
    results = []
    for physical in (0, 3):
        adapters.set_adapter(model, initial)
        mechanism = DPSGD(target_epsilon=4.0, grad_sample_mode=mode, reproducible_noise=True)  # type: ignore[arg-type]
        config, state = TrainConfig(local_steps=4, batch_size=8, lr=0.01, physical_batch_size=physical), {}
        metrics = local_train(model, ROWS, "classification", tokenizer, 32, config, torch.Generator().manual_seed(0),
                              mechanism, total_steps=4, privacy_state=state)  # fmt: skip
        results.append((adapters.get_adapter(model), metrics, json.loads(state[STATE_KEY])["history"]))
    (whole, whole_metrics, whole_history), (split, split_metrics, split_history) = results
    assert split_history == whole_history and split_metrics["epsilon"] == whole_metrics["epsilon"]
    assert math.isclose(split_metrics["train_loss"], whole_metrics["train_loss"], rel_tol=1e-5)
    assert not torch.equal(whole[next(iter(whole))], initial[next(iter(initial))])  # the steps moved the adapter
    for name, tensor in whole.items():
        assert torch.allclose(split[name], tensor, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("mode", ["flat", "hooks"])
def test_under_bf16_autocast_each_record_is_clipped_as_in_float32(model_and_tokenizer, mode: str) -> None:  # noqa: ANN001
    """Autocast hands a LoRA layer float32 inputs (LayerNorm's output) and bfloat16 output gradients."""
    model, tokenizer = model_and_tokenizer
    mechanism = DPSGD(target_epsilon=None, noise_multiplier=1e-12, max_grad_norm=0.01, grad_sample_mode=mode)  # type: ignore[arg-type]
    indices = [0, 5, 11, 17, 23, 31]
    full = _one_step_gradient(model, tokenizer, mechanism, indices)
    half = _one_step_gradient(model, tokenizer, mechanism, indices, precision="bf16")
    for name, gradient in full.items():  # bfloat16 keeps 8 bits of mantissa: agreement to a few per cent
        assert torch.allclose(half[name], gradient, rtol=0.05, atol=0.05 * float(gradient.abs().max())), name


@pytest.mark.parametrize(
    "mode", ["flat", "hooks", "ghost"]
)  # three optimizers: flat buffer, per-record gradients, ghost
def test_noise_has_the_configured_standard_deviation(model_and_tokenizer, mode: str) -> None:  # noqa: ANN001
    model, tokenizer = model_and_tokenizer
    sigma, clip = 1.3, 0.5
    mechanism = DPSGD(target_epsilon=None, noise_multiplier=sigma, max_grad_norm=clip, grad_sample_mode=mode)  # type: ignore[arg-type]
    noise = _one_step_gradient(model, tokenizer, mechanism, [])
    values = torch.cat([g.flatten() for g in noise.values()]) * 8  # undo the division by the expected batch size
    expected = sigma * clip
    assert values.numel() > 1000
    # sample std of n Gaussians: relative standard error 1/sqrt(2n), about 2 % here; allow 3.3 of them
    assert abs(values.std().item() / expected - 1) < 0.07
    assert abs(values.mean().item()) < 4 * expected / math.sqrt(values.numel())


def test_epsilon_over_rounds_matches_opacus_rdp_analysis_and_the_target(model_and_tokenizer) -> None:  # noqa: ANN001
    model, tokenizer = model_and_tokenizer
    mechanism, state, rounds, steps = DPSGD(target_epsilon=3.0), {}, 3, 4
    config = TrainConfig(local_steps=steps, batch_size=8, lr=0.01)
    reported = []
    for r in range(rounds):
        metrics = local_train(model, ROWS, "classification", tokenizer, 32, config, torch.Generator().manual_seed(r),
                              mechanism, total_steps=rounds * steps, privacy_state=state)  # fmt: skip
        reported.append(metrics["epsilon"])
        state = json.loads(json.dumps(state))  # the state survives serialisation (Flower ConfigRecord holds a string)
    saved = json.loads(state[STATE_KEY])
    q, sigma, delta = 8 / len(ROWS), saved["noise_multiplier"], saved["delta"]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    reference, _ = get_privacy_spent(
        orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=rounds * steps, orders=orders), delta=delta
    )
    assert math.isclose(reported[-1], reference, rel_tol=1e-6)
    assert reported == sorted(reported) and reported[0] < reported[-1]  # epsilon accumulates over rounds
    assert reported[-1] <= 3.0 * 1.01 and reported[-1] > 3.0 * 0.95  # calibrated to spend the target over the run
    assert delta == 1 / (10 * len(ROWS))


def test_a_client_past_its_budget_does_not_train_again(model_and_tokenizer) -> None:  # noqa: ANN001
    model, tokenizer = model_and_tokenizer
    mechanism, state, config = DPSGD(target_epsilon=2.0), {}, TrainConfig(local_steps=3, batch_size=8)
    for r in range(2):  # the run was planned for 2 rounds of 3 steps
        local_train(
            model, ROWS, "classification", tokenizer, 32, config, torch.Generator().manual_seed(r), mechanism, 6, state
        )
    before = adapters.get_adapter(model)
    with pytest.raises(PrivacyBudgetExhaustedError, match="does not train again"):
        local_train(model, ROWS, "classification", tokenizer, 32, config, torch.Generator(), mechanism, 6, state)
    assert adapters.fingerprint(adapters.get_adapter(model)) == adapters.fingerprint(before)


def test_poisson_batches_sample_each_record_independently() -> None:
    batches = list(poisson_batches(1000, 0.05, 200, torch.Generator().manual_seed(0)))
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float)
    assert abs(sizes.mean().item() - 50) < 2 and abs(sizes.var().item() / (1000 * 0.05 * 0.95) - 1) < 0.25
    assert [len(b) for b in poisson_batches(10, 0.01, 50, torch.Generator().manual_seed(0))].count(
        0
    ) > 0  # empty draws happen


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_batches_still_add_noise_and_are_accounted(model_and_tokenizer, mode: str) -> None:  # noqa: ANN001
    model, tokenizer = model_and_tokenizer
    tiny = ROWS.select(range(4))  # q = 1/4... with batch 1, many empty draws
    state: dict = {}
    local_train(model, tiny, "classification", tokenizer, 32, TrainConfig(local_steps=12, batch_size=1), torch.Generator().manual_seed(0),
                DPSGD(target_epsilon=None, noise_multiplier=1.0, grad_sample_mode=mode), 12, state)  # type: ignore[arg-type]  # fmt: skip
    assert sum(entry[2] for entry in json.loads(state[STATE_KEY])["history"]) == 12


def test_delta_defaults_below_one_over_n_and_a_larger_one_is_refused() -> None:
    assert DPSGD().delta_for(500) == 1 / 5000
    with pytest.raises(ValueError, match="not below 1/n"):
        DPSGD(delta=0.01).delta_for(500)


@pytest.mark.parametrize("lora, mode, setting", [
    (LoraConfig(r=4, use_dora=True), "hooks", "lora.use_dora"),
    (LoraConfig(r=4, target_modules=["query", "word_embeddings"]), "hooks", "lora.target_modules"),
    (LoraConfig(r=4, modules_to_save=["LayerNorm"]), "ew", "grad_sample_mode=flat"),
])  # fmt: skip
def test_combinations_opacus_cannot_handle_are_refused(
    tiny_bert_dir: Path, lora: LoraConfig, mode: str, setting: str
) -> None:
    model, _ = build_model(ModelSpec(str(tiny_bert_dir), "classification", 32), lora, num_labels=3, seed=0)
    with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
        DPSGD(grad_sample_mode=mode).check_model(model)  # type: ignore[arg-type]


def test_ghost_clipping_refuses_tied_trainable_weights() -> None:
    tied = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    tied[1].weight = tied[0].weight  # one parameter, two layers: ghost would add two partial norms, not one
    with pytest.raises(ValueError, match="grad_sample_mode=hooks"):
        DPSGD(grad_sample_mode="ghost").check_model(tied)
    DPSGD(grad_sample_mode="hooks").check_model(tied)  # hooks sum the per-record gradients of both uses first


def test_refusal_happens_at_start_of_a_run(
    tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedtune import cli

    args = [
        "run",
        "model=local",
        f"model.path={tiny_bert_dir}",
        "privacy=dp_sgd",
        "lora.use_dora=true",
        f"run_dir={tmp_path / 'r'}",
    ]
    assert cli.main(args) == 2
    assert "lora.use_dora=false" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override", ["privacy.noise_multiplier=1.0", "privacy.target_epsilon=-1", "privacy.grad_sample_mode=fast"]
)
def test_bad_privacy_settings_fail_at_config_time(override: str) -> None:
    with pytest.raises(config.ConfigError, match="privacy"):
        config.compose(["privacy=dp_sgd", override])


def test_federated_run_reports_every_clients_epsilon_and_the_maximum(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from fedtune.run_dir import RunDir
    from tests.conftest import tiny_overrides
    from tests.nodes import federate

    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", "privacy=dp_sgd", "privacy.target_epsilon=2.0")
    federate(tmp_path, overrides, 2, prefix="partition")
    lines = RunDir(tmp_path / "run").read_metrics()
    per_client = {(m["round"], m["scope"]): m["value"] for m in lines if m["metric"] == "epsilon"}
    maxima = {m["round"]: m["value"] for m in lines if m["metric"] == "epsilon_max"}
    assert set(per_client) == {(r, f"client:partition-{c}") for r in (1, 2) for c in (0, 1)}
    for r in (1, 2):  # the server reports the worst-off client, never a mean
        assert maxima[r] == max(v for (round_, _), v in per_client.items() if round_ == r)
    assert per_client[(1, "client:partition-0")] < per_client[(2, "client:partition-0")] <= 2.0 * 1.001
    assert maxima[2] > 2.0 * 0.95  # accountant state survived between rounds in Flower's Context.state
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"maximum **{maxima[2]:.3f}**" in card and "DP-SGD per record" in card


def test_privacy_state_survives_resume_and_a_replayed_round_is_not_charged_twice(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    import shutil

    from fedtune.run_dir import RunDir
    from tests.conftest import tiny_overrides
    from tests.nodes import federate

    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", "privacy=dp_sgd", "privacy.target_epsilon=2.0")
    federate(tmp_path, overrides, 2, prefix="partition")
    final = torch.load(tmp_path / "run" / "checkpoints" / "round-0002.pt", weights_only=True)["adapter"]
    before = [m for m in RunDir(tmp_path / "run").read_metrics() if m["metric"] == "epsilon"]
    # A crash during round 2: its checkpoint and outputs are gone, the clients had already trained it.
    (tmp_path / "run" / "checkpoints" / "round-0002.pt").unlink()
    shutil.rmtree(tmp_path / "run" / "adapter")
    federate(tmp_path, [*overrides, "resume=true"], 2, prefix="partition")  # new nodes: Context.state starts empty
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "round-0002.pt", weights_only=True)["adapter"]
    after = [m for m in RunDir(tmp_path / "run").read_metrics() if m["metric"] == "epsilon"]
    assert adapters.fingerprint(resumed) == adapters.fingerprint(final)
    assert after == before  # round 1 from the clients' durable ledgers, round 2 replayed at the same cost


def test_a_replay_with_the_same_input_is_not_charged_again_and_another_input_is_refused() -> None:
    from fedtune import client_state
    from fedtune.secure.session import ProtocolError

    state: dict = {}
    client_state.begin_round(state, 1, "adapter-a")
    state["dp_sgd"] = "after round 1"
    client_state.begin_round(state, 1, "adapter-a")  # same round, same input: a deterministic replay
    assert "dp_sgd" not in state
    state["dp_sgd"] = "after round 1"
    with pytest.raises(ProtocolError, match="already trained round 1"):  # the same noise on another input
        client_state.begin_round(state, 1, "adapter-b")
    assert state["dp_sgd"] == "after round 1"  # nothing was restored or spent


@pytest.mark.parametrize("reproducible", [False, True])
def test_noise_is_secret_unless_reproducibility_is_asked_for(model_and_tokenizer, reproducible: bool) -> None:  # noqa: ANN001
    model, tokenizer = model_and_tokenizer
    mechanism = DPSGD(target_epsilon=None, noise_multiplier=1.0, reproducible_noise=reproducible)
    results = []
    for _ in range(2):  # two clients with the same config, seed and data, each with its own fresh state
        state: dict = {}
        start = adapters.get_adapter(model)
        local_train(model, ROWS, "classification", tokenizer, 32, TrainConfig(local_steps=2, batch_size=8),
                    torch.Generator().manual_seed(7), mechanism, 2, state)  # fmt: skip
        results.append(adapters.fingerprint(adapters.get_adapter(model)))
        adapters.set_adapter(model, start)
        assert ("noise_secret" in state) is not reproducible  # the secret stays in the client's own state
    assert (results[0] == results[1]) is reproducible  # with the public seed alone, the noise could be recomputed


@pytest.mark.parametrize("mode", [None, "flat", "hooks", "ghost"])
def test_fedprox_term_is_added_after_per_record_clipping_and_noise(model_and_tokenizer, mode: str | None) -> None:  # noqa: ANN001
    """With the parameters at w and the global adapter at w0, the gradient the inner optimizer applies is the
    clipped, noised gradient (same noise) plus exactly mu (w - w0): the term never enters a record's gradient,
    so clipping and the privacy analysis are those of DP-SGD without it."""
    model, tokenizer = model_and_tokenizer
    mu, indices = 3.0, [0, 5, 11, 17, 23, 31]
    mechanism = (
        NoPrivacy()
        if mode is None
        else DPSGD(
            target_epsilon=None,
            noise_multiplier=0.7,
            max_grad_norm=0.01,
            grad_sample_mode=mode,
            reproducible_noise=True,
        )  # type: ignore[arg-type]
    )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(1)
    offset = {n: 0.05 * torch.randn(p.shape, generator=generator) for n, p in named}

    def applied(proximal_mu: float) -> dict[str, torch.Tensor]:
        optimizer = torch.optim.SGD([p for _, p in named], lr=0.0)
        request = PlanRequest(model, optimizer, len(ROWS), 8, 1, 1, torch.Generator().manual_seed(0), {})
        plan = mechanism.plan(request)
        handle = add_proximal_term(optimizer, proximal_mu)  # anchors: the parameters now (the global adapter)
        seen: dict[str, torch.Tensor] = {}
        optimizer.register_step_pre_hook(lambda *_: seen.update({n: p.grad.clone() for n, p in named}))
        with torch.no_grad():
            for n, p in named:
                p.add_(offset[n])  # local training has moved the adapter away from the global one
        model.train()
        try:
            batch = encode(ROWS[indices], "classification", tokenizer, 32)
            labels, input_ids = batch.pop("labels"), batch.pop("input_ids")
            plan.backward(sequence_loss(plan.module(input_ids, **batch).logits, labels, "classification"))
            plan.optimizer.step()
        finally:
            handle.remove()
            with torch.no_grad():
                for n, p in named:
                    p.sub_(offset[n])
            plan.optimizer.zero_grad(set_to_none=True)
            plan.close()
            model.eval()
        return seen

    without, with_term = applied(0.0), applied(mu)
    assert set(without) == {n for n, _ in named}
    for n, _ in named:
        assert torch.allclose(with_term[n] - without[n], mu * offset[n], rtol=1e-5, atol=1e-7), n
