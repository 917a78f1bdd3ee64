"""A portable adapter: it names its base model by a public Hugging Face id, never by the training machine's path,
and loads with PEFT's auto class on another machine, from a copied location.

The other machine is played offline: the base model lies in a Hugging Face cache of the test's own (the layout
``huggingface_hub`` writes when it downloads ``namespace/name``), and nothing may reach the network, so
the id in ``adapter_config.json`` is what finds it. The reference is the run's own model with its final adapter.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from peft import AutoPeftModelForSequenceClassification, LoraConfig

from fedtune import config, model_fingerprint, portable
from fedtune.assets import minilm_dir
from fedtune.experiment import get_experiment
from fedtune.finished_run import load_run
from fedtune.models import ModelSpec, build_model
from tests.conftest import tiny_overrides

PUBLIC_NAME = "fedtune-tests/tiny-bert"  # the tiny_run fixture's model.public_name


def _with_recorded_name(source: Path, target: Path, recorded: str) -> Path:
    """A copy of a model directory whose config.json records ``recorded`` as where it was loaded from."""
    shutil.copytree(source, target)
    settings = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**settings, "_name_or_path": recorded}))
    return target


def _hub_cache(model_dir: Path, cache: Path, repo_id: str) -> Path:
    """A Hugging Face cache holding ``model_dir`` as the main revision of ``repo_id`` (huggingface_hub's layout)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    shutil.copytree(model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return cache


def test_each_kind_of_base_model_gets_its_public_name(tiny_bert_dir: Path, tmp_path: Path) -> None:
    # The packaged MiniLM's config.json records the model it was trained from, not itself: the table decides.
    assert json.loads((minilm_dir() / "config.json").read_text())["_name_or_path"] == "nreimers/MiniLM-L6-H384-uncased"
    assert portable.public_base(ModelSpec("builtin:minilm")).name == "sentence-transformers/all-MiniLM-L6-v2"
    assert portable.public_base(ModelSpec("builtin:smollm2", "causal_lm")).name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable.public_base(ModelSpec(str(tiny_bert_dir), public_name="org/given")).name == "org/given"
    recorded = _with_recorded_name(tiny_bert_dir, tmp_path / "from-hub", "dmis-lab/biobert-v1.1")
    assert portable.public_base(ModelSpec(str(recorded))).name == "dmis-lab/biobert-v1.1"
    for local in ("/home/me/models/bert", "./bert", "bert"):  # where it was saved from, on someone's machine
        path = _with_recorded_name(tiny_bert_dir, tmp_path / f"saved-{len(local)}", local)
        assert portable.public_base(ModelSpec(str(path))).name is None
    assert portable.public_base(ModelSpec(str(tiny_bert_dir))).name is None  # transformers 5 records none


def test_a_public_name_is_checked_and_trains_nothing(tiny_bert_dir: Path, tmp_path: Path) -> None:
    for bad in ("/models/bert", "bert", "a/b/c", "org/../x", "org--x/y"):
        with pytest.raises(ValueError, match=f"model.public_name={bad!r} is not a Hugging Face model id"):
            ModelSpec(str(tiny_bert_dir), public_name=bad)
    with pytest.raises(ValueError, match="builtin:minilm is always named by its upstream id"):
        ModelSpec("builtin:minilm", public_name="org/x")
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run")
    named, unnamed = config.compose([*overrides, f"model.public_name={PUBLIC_NAME}"]), config.compose(overrides)
    assert config.experiment_hash(named) == config.experiment_hash(unnamed)  # a run may resume with a name
    assert get_experiment(named).model_spec.public_name == PUBLIC_NAME  # yet each run writes its own
    assert get_experiment(unnamed).model_spec.public_name is None


def test_the_adapter_names_no_path_and_loads_with_peft_s_auto_class_elsewhere(
    tiny_run: Path, tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = (tiny_run / "adapter" / "adapter_config.json").read_text()
    assert str(tiny_bert_dir) not in settings and json.loads(settings)["base_model_name_or_path"] == PUBLIC_NAME
    metadata, card = (tiny_run / "adapter" / "README.md").read_text().removeprefix("---\n").split("---\n\n", 1)
    assert metadata == f"base_model: {PUBLIC_NAME}\nlibrary_name: peft\ntags:\n- fedtune\n"  # what the Hub reads
    assert card == (tiny_run / "README.md").read_text()  # the model card, which records the files trained on
    assert f"`{tiny_bert_dir}`" in card and f"`sha256:{model_fingerprint.fingerprint(tiny_bert_dir)}`" in card

    elsewhere = Path(shutil.copytree(tiny_run / "adapter", tmp_path / "elsewhere" / "adapter"))
    cache = _hub_cache(tiny_bert_dir, tmp_path / "hf-cache", PUBLIC_NAME)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an offline site, as PEFT reads it, and as huggingface_hub read it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # at import
    lookups: list[tuple] = []
    monkeypatch.setattr(socket, "getaddrinfo", lambda *address, **_: lookups.append(address) or [])
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(elsewhere, num_labels=22, cache_dir=cache).eval()
    assert lookups == []  # nothing reached for the network
    reference = load_run(tiny_run)
    batch = reference.experiment.tokenizer(["fever", "a fracture of the left femur"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, reference.model()(**batch).logits, atol=1e-6)


def test_without_a_public_name_the_adapter_names_none_and_the_run_says_so(
    tiny_bert_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spec = ModelSpec(str(tiny_bert_dir), max_length=32)
    model, _ = build_model(spec, LoraConfig(r=4, lora_alpha=8), num_labels=3, seed=0)
    portable.save_adapter(model, tmp_path / "adapter", spec, "# card\n")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    readme = (tmp_path / "adapter" / "README.md").read_text()
    assert readme.startswith("---\nlibrary_name: peft\n") and readme.endswith("# card\n")
    assert "No public name (classification" in portable.base_model_section(spec)
    with caplog.at_level(logging.WARNING, logger="fedtune"):
        portable.warn_if_unnamed(spec)
        portable.warn_if_unnamed(ModelSpec(str(tiny_bert_dir), public_name=PUBLIC_NAME))
    assert [record.getMessage().split(":")[0] for record in caplog.records] == [
        f"model.path={tiny_bert_dir} records no Hugging Face id (_name_or_path in its config.json)"
    ]
