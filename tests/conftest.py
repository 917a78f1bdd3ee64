"""Shared fixtures: tiny offline models saved as local Hugging Face directories, and tiny experiments."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from fedtune.assets import minilm_dir


def _save_tokenizer(target: Path) -> int:
    # The packaged MiniLM tokenizer (WordPiece, 30,522 tokens) serves both tiny models; [SEP] ends answers.
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    tokenizer.eos_token = tokenizer.sep_token
    tokenizer.save_pretrained(target)
    return len(tokenizer)


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fedtune cache of the session's own: tests neither read nor leave anything in the user's (the server's
    identity key, simulated nodes' identities and records), and Ray workers and Flower processes inherit it."""
    cache = tmp_path_factory.mktemp("fedtune-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDTUNE_CACHE", str(cache))
        yield cache


def save_tiny_bert(target: Path, vocab: int) -> None:
    """A 2-layer BERT encoder (random weights, seeded), saved like a user's local model."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=0.0,  # deterministic in training mode, so per-record references are exact
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(target)


def save_tiny_llama(target: Path, vocab: int) -> None:
    """A 2-layer Llama causal LM (random weights, seeded), saved like a user's local model."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(target)


def tiny_model_dir(
    factory: pytest.TempPathFactory,
    name: str,
    save_model: Callable[[Path, int], None],
    save_tokenizer: Callable[[Path], int],
) -> Path:
    """A directory holding a tokenizer and a tiny model sized to its vocabulary, like a user's local model."""
    target = factory.mktemp(name)
    save_model(target, save_tokenizer(target))
    return target


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT with the packaged MiniLM tokenizer."""
    return tiny_model_dir(tmp_path_factory, "tiny-bert", save_tiny_bert, _save_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with the packaged MiniLM tokenizer."""
    return tiny_model_dir(tmp_path_factory, "tiny-llama", save_tiny_llama, _save_tokenizer)


def tiny_overrides(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides for a seconds-long experiment on the tiny BERT and a slice of ICD-10."""
    return [
        "model=local",
        f"model.path={model_dir}",
        "model.max_length=32",
        "data.loader.max_examples=400",
        "data.test_size=60",
        "partition=iid",
        "federation.num_clients=2",
        "federation.num_rounds=2",
        "train.local_steps=3",
        "train.batch_size=8",
        "train.eval_max_examples=48",
        f"run_dir={run_dir}",
        *extra,
    ]


@pytest.fixture
def tiny_bert_overrides(tiny_bert_dir: Path, tmp_path: Path) -> list[str]:
    """Overrides of a tiny classification experiment writing to a fresh run directory."""
    return tiny_overrides(tiny_bert_dir, tmp_path / "run")


@pytest.fixture(scope="session")
def tiny_run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-round run of the tiny classification experiment (in-process nodes), whose base model has the
    public name ``fedtune-tests/tiny-bert``."""
    from tests.nodes import federate  # deferred: tests/test_gpu.py imports this module where Flower is absent

    root = tmp_path_factory.mktemp("tiny-run")
    overrides = tiny_overrides(tiny_bert_dir, root / "run", "model.public_name=fedtune-tests/tiny-bert")
    return federate(root, overrides, 2, prefix="partition")


@pytest.fixture(scope="session")
def tiny_causal_run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-round run of the tiny Llama on ICD-10 instructions (in-process nodes)."""
    from tests.nodes import federate

    root = tmp_path_factory.mktemp("tiny-causal-run")
    causal = ("data=icd10_instructions", "model.task=causal_lm", "train.generation_examples=2")
    return federate(root, tiny_overrides(tiny_llama_dir, root / "run", *causal), 2, prefix="partition")


@pytest.fixture(scope="session")
def tiny_plain_text_run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-round run of the tiny Llama continuing plain-text documents under DP-SGD (in-process nodes):
    400 HPO definitions in a site's own CSV (``notes.csv`` beside the run directory), under the column ``note``;
    the run's data.loader.task follows model.task."""
    from fedtune.data import hpo_text
    from tests.nodes import federate

    root = tmp_path_factory.mktemp("tiny-plain-text-run")
    hpo_text(max_examples=400, seed=0).dataset.rename_column("text", "note").to_csv(root / "notes.csv")
    notes = (
        "model.task=plain_text",
        "data=local",
        f"data.loader.path={root / 'notes.csv'}",
        "data.loader.text_column=note",
    )
    overrides = tiny_overrides(tiny_llama_dir, root / "run", *notes, "privacy=dp_sgd")
    # a local file is read whole: max_examples, a built-in corpus's setting, is not one of its settings
    overrides = [override for override in overrides if not override.startswith("data.loader.max_examples=")]
    return federate(root, overrides, 2, prefix="partition")
