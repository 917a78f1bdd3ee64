"""Adapter get/set/delta round trips on a real PEFT model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from fedtune import adapters
from fedtune.models import ModelSpec, build_model


@pytest.fixture
def model(tiny_bert_dir: Path):  # noqa: ANN201
    model, initial = build_model(
        ModelSpec(str(tiny_bert_dir), "classification", 32), LoraConfig(r=4, lora_alpha=8), num_labels=3, seed=0
    )
    adapters.set_adapter(model, initial)
    return model


def test_adapter_holds_only_trainable_tensors(model) -> None:  # noqa: ANN001
    adapter = adapters.get_adapter(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert adapters.num_parameters(adapter) == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert any("lora_A" in k for k in adapter) and any("classifier" in k for k in adapter)
    assert all("embeddings.word_embeddings" not in k for k in adapter)  # the frozen base never travels


def test_set_then_get_round_trips_exactly(model) -> None:  # noqa: ANN001
    original = adapters.get_adapter(model)
    random = {k: torch.randn_like(v) for k, v in original.items()}
    adapters.set_adapter(model, random)
    assert adapters.fingerprint(adapters.get_adapter(model)) == adapters.fingerprint(random)
    adapters.set_adapter(model, original)
    assert all(torch.equal(a, b) for a, b in zip(adapters.get_adapter(model).values(), original.values(), strict=True))


def test_set_changes_the_model_output(model) -> None:  # noqa: ANN001
    inputs = {"input_ids": torch.tensor([[101, 2000, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    before = model(**inputs).logits.detach().clone()
    adapters.set_adapter(model, {k: v + 0.5 for k, v in adapters.get_adapter(model).items()})
    assert not torch.allclose(before, model(**inputs).logits)


def test_subtract_is_the_key_by_key_difference(model) -> None:  # noqa: ANN001
    a = adapters.get_adapter(model)
    b = {k: v + torch.randn_like(v) for k, v in a.items()}
    assert all(torch.equal(d, b[k] - a[k]) for k, d in adapters.subtract(b, a).items())
    with pytest.raises(ValueError, match="different tensors"):
        adapters.subtract(b, {k: v for k, v in list(a.items())[1:]})


def test_mismatched_adapter_is_refused_and_the_model_is_untouched(model) -> None:  # noqa: ANN001
    original = adapters.get_adapter(model)
    wrong_keys = {k + ".x": v for k, v in original.items()}
    with pytest.raises(ValueError, match="does not match"):
        adapters.set_adapter(model, wrong_keys)
    key = next(iter(original))
    wrong_shape = {**original, key: torch.zeros(1)}
    with pytest.raises(ValueError, match="shape"):
        adapters.set_adapter(model, wrong_shape)
    assert adapters.fingerprint(adapters.get_adapter(model)) == adapters.fingerprint(original)


def test_fingerprint_detects_a_single_bit(model) -> None:  # noqa: ANN001
    adapter = adapters.get_adapter(model)
    key = next(iter(adapter))
    flipped = {**adapter, key: adapter[key].clone()}
    flipped[key].view(torch.int32).view(-1)[0] ^= 1
    assert adapters.fingerprint(flipped) != adapters.fingerprint(adapter)


def test_check_update_refuses_what_no_honest_client_sends(model) -> None:  # noqa: ANN001
    reference = adapters.get_adapter(model)
    key = next(iter(reference))
    adapters.check_update({k: torch.zeros_like(v) for k, v in reference.items()}, reference)  # a valid update
    with pytest.raises(ValueError, match="NaN or infinite"):
        adapters.check_update({**reference, key: torch.full_like(reference[key], float("inf"))}, reference)
    with pytest.raises(ValueError, match="expected"):
        adapters.check_update({**reference, key: reference[key].double()}, reference)
    with pytest.raises(ValueError, match="different tensors"):
        adapters.check_update({k: v for k, v in reference.items() if k != key}, reference)
