"""Training on a CUDA GPU: the same results as on the CPU, DP noise from a GPU generator, bit-for-bit repeats.

Skipped without a GPU (CI has none); run on a GPU machine with ``benchmarks/gpu/run.sh``. The models
and the word-level tokenizer are built here, so these tests need only torch, transformers, peft, opacus
and datasets (no built-in model packages).
"""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import pytest
import torch
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fedtune import adapters, devices
from fedtune.evaluation import evaluate
from fedtune.models import ModelSpec, build_model, load_tokenizer
from fedtune.privacy import PlanRequest
from fedtune.privacy.dp_sgd import DPSGD
from fedtune.training import TrainConfig, encode, local_train, sequence_loss
from tests.conftest import save_tiny_bert, save_tiny_llama, tiny_model_dir

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TEXTS = datasets.Dataset.from_dict(
    {"text": [f"patient {i} has symptom {i % 7}" for i in range(40)], "label": [i % 3 for i in range(40)]}
)
QA = datasets.Dataset.from_dict({"prompt": [f"code {i} ?" for i in range(24)], "response": ["chapter one"] * 24})


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    """The GPU, resolved as fedtune resolves train.device (which also makes its kernels reproducible)."""
    return devices.resolve("cuda")


def _word_tokenizer(target: Path) -> int:
    """A word-level tokenizer over the test texts, built here (the MiniLM package need not be installed)."""
    words = {w for column in (TEXTS["text"], QA["prompt"], QA["response"]) for text in column for w in text.split()}
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[SEP]", *sorted(words)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[SEP]")
    fast.save_pretrained(target)
    return len(vocab)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory, "gpu-bert", save_tiny_bert, _word_tokenizer)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory, "gpu-llama", save_tiny_llama, _word_tokenizer)


def test_auto_picks_the_gpu(cuda: torch.device) -> None:
    assert devices.resolve("auto") == torch.device("cuda") and cuda.type == "cuda"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_the_gpu_learns_returns_a_cpu_float32_update_and_repeats_bit_for_bit(
    llama_dir: Path, cuda: torch.device, precision: str
) -> None:
    spec = ModelSpec(str(llama_dir), "causal_lm", 32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    model, initial = build_model(spec, lora, None, 0, cuda, precision)
    assert devices.of(model).type == "cuda"
    config = TrainConfig(local_steps=60, batch_size=8, lr=0.01, generation_examples=2, precision=precision)
    tokenizer = load_tokenizer(spec)
    results = []
    for _ in range(2):
        adapters.set_adapter(model, initial)
        before = evaluate(model, QA, "causal_lm", tokenizer, 32, config)
        local_train(model, QA, "causal_lm", tokenizer, 32, config, torch.Generator().manual_seed(0))
        after = evaluate(model, QA, "causal_lm", tokenizer, 32, config)
        assert after["loss"] < before["loss"] - 0.25 and 0 <= after["exact_match"] <= 1
        results.append(adapters.get_adapter(model))
    assert {(t.device.type, t.dtype) for t in results[0].values()} == {("cpu", torch.float32)}
    assert adapters.fingerprint(results[0]) == adapters.fingerprint(results[1])  # same seed, same bits


def _dp_gradient(model: torch.nn.Module, spec: ModelSpec, mechanism: DPSGD, seed: int) -> torch.Tensor:
    """The gradient the DP optimizer hands on for one fixed batch, flattened, on the CPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    plan = mechanism.plan(PlanRequest(model, torch.optim.SGD(params, lr=0.0), len(TEXTS), 8, 1, 1,
                                      torch.Generator().manual_seed(seed), {}))  # fmt: skip
    model.train()
    try:
        batch = encode(TEXTS[[0, 5, 11, 17, 23, 31]], "classification", load_tokenizer(spec), 32, devices.of(model))
        labels, input_ids = batch.pop("labels"), batch.pop("input_ids")
        plan.backward(sequence_loss(plan.module(input_ids, **batch).logits, labels, "classification"))
        plan.optimizer.pre_step()
        return torch.cat([p.grad.detach().flatten().cpu() for p in params])
    finally:
        plan.optimizer.zero_grad(set_to_none=True)
        plan.close()
        model.eval()


@pytest.mark.parametrize("mode", ["flat", "hooks", "functorch", "ew", "ghost"])
def test_dp_sgd_on_the_gpu_clips_as_on_the_cpu(bert_dir: Path, cuda: torch.device, mode: str) -> None:
    spec = ModelSpec(str(bert_dir), "classification", 32)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    mechanism = DPSGD(target_epsilon=None, noise_multiplier=1e-12, max_grad_norm=0.01, grad_sample_mode=mode)  # type: ignore[arg-type]
    gradients = []
    for device in (torch.device("cpu"), cuda):
        model, initial = build_model(spec, lora, 3, 0, device)
        adapters.set_adapter(model, initial)
        gradients.append(_dp_gradient(model, spec, mechanism, seed=0))
    assert gradients[0].abs().sum() > 0
    assert torch.allclose(gradients[1], gradients[0], rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("mode", ["flat", "hooks", "ghost"])
def test_dp_noise_on_the_gpu_has_the_configured_scale_and_stays_secret(
    bert_dir: Path, cuda: torch.device, mode: str
) -> None:
    spec = ModelSpec(str(bert_dir), "classification", 32)
    model, initial = build_model(spec, LoraConfig(r=4, lora_alpha=8), 3, 0, cuda)
    adapters.set_adapter(model, initial)
    sigma, clip = 1.3, 0.5
    mechanism = DPSGD(target_epsilon=None, noise_multiplier=sigma, max_grad_norm=clip, grad_sample_mode=mode)  # type: ignore[arg-type]
    first, second = (_dp_gradient(model, spec, mechanism, seed=0) for _ in range(2))
    noise = first * 8  # undo the division by the expected batch size; the signal is below clip/8 per value
    assert abs(noise.std().item() / (sigma * clip) - 1) < 0.1
    assert not torch.equal(first, second)  # each fresh client state draws its own secret noise
    assert math.isfinite(noise.sum().item())
