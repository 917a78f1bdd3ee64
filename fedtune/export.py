"""``fedtune export RUN_DIR --merged OUT``: a run's final adapter merged into its base model, as a plain Hugging
Face model directory (weights, config, tokenizer, model card), the format inference servers load.

What the directory holds depends on what was trained:

- a causal LM: an ``AutoModelForCausalLM`` directory;
- a classifier with ``model.pooling=cls``: an ``AutoModelForSequenceClassification`` directory whose config
  names the run's classes (``id2label``);
- a classifier with ``model.pooling=mean`` (the default of ``model=minilm``): no Transformers class pools by
  mean (BERT's classifier reads its pooler over the first token), and fedtune ships no remote code. The
  directory holds the merged encoder as an ``AutoModel`` (without BERT's pooler, which the head never read),
  the head in ``classifier.safetensors`` (``weight``, ``bias``), and a model card with the few lines of
  Transformers and torch that pool and apply it (``tests/test_export.py`` runs those very lines).
"""

from __future__ import annotations

import copy
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from fedtune import adapters, config, portable
from fedtune.finished_run import FinishedRun

HEAD_FILE = "classifier.safetensors"  # a mean-pooling classifier's head, beside its encoder


def export_merged(run: FinishedRun, out: Path) -> str:
    """Write ``run``'s final adapter merged into its base model to the new directory ``out``; returns the
    Transformers class (or classes) that load it. Written in a staging directory and renamed at the end, so
    ``out`` is complete or absent.

    Raises:
        ConfigError: ``out`` exists and is not empty, or a mean-pooling classifier has no linear ``classifier``.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise config.ConfigError(f"{out} exists and is not empty: fedtune export writes a new directory.")
    spec = run.experiment.model_spec
    # merge_and_unload changes the model it merges, and run.model() is the process's cached one: merge a copy
    model = copy.deepcopy(run.model()).merge_and_unload()
    if run.label_names is not None:
        model.config.id2label = dict(enumerate(run.label_names))
        model.config.label2id = {name: index for index, name in enumerate(run.label_names)}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}")  # mkdir, not mkdtemp: the umask's mode, not 0700
    staging.mkdir()
    try:
        if spec.pooling == "mean":
            _save_mean_pooling(model, staging)
            loader = f"AutoModel and {HEAD_FILE} (mean pooling)"
        else:
            model.save_pretrained(staging)
            loader = "AutoModelForSequenceClassification" if spec.task == "classification" else "AutoModelForCausalLM"
        run.experiment.tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(_card(run), encoding="utf-8")
        staging.rename(out)  # onto nothing, or onto an empty directory
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return loader


def _save_mean_pooling(model: torch.nn.Module, directory: Path) -> None:
    """The encoder as an ``AutoModel`` directory and its classifier head beside it (``model`` is a merged copy)."""
    head = getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Linear):
        raise config.ConfigError(
            f"{type(model).__name__}'s head is not one linear layer named 'classifier': fedtune export cannot write "
            "it beside the encoder. Load the run's adapter with PEFT instead (the run's model card says how)."
        )
    encoder = getattr(model, model.base_model_prefix)
    encoder.pooler = None  # the mean pooler has no weights, and BERT's own was never read
    encoder.save_pretrained(directory)
    save_file(
        {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, directory / HEAD_FILE
    )


def _card(run: FinishedRun) -> str:
    """The merged model's card: how to load it, then the run's own model card."""
    spec = run.experiment.model_spec
    public = portable.public_base(spec).name
    run_card = run.path / "README.md"
    fingerprint = adapters.fingerprint(run.checkpoint.adapter)[:16]
    return f"""{portable.front_matter(public, "transformers")}# A federated LoRA adapter merged into its base model

`fedtune export` merged the final adapter of `{run.path}` (round {run.checkpoint.round}, adapter fingerprint
`{fingerprint}`) into its base model{f" `{public}`" if public else ""}: a plain Transformers model, no PEFT
needed. Load it from this directory (`model_dir` below); training truncated inputs to {spec.max_length} tokens.

{_loading(spec.task, spec.pooling, spec.max_length)}
The run's model card follows; its loading section is about the run's `adapter/`, which this model holds merged.

{run_card.read_text(encoding="utf-8") if run_card.is_file() else ""}"""


def _loading(task: str, pooling: str, max_length: int) -> str:
    """The lines that load the merged model from ``model_dir`` (and, for mean pooling, compute logits)."""
    if task != "classification":
        return """```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
```
"""
    if pooling == "cls":
        return """```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForSequenceClassification.from_pretrained(model_dir)  # config.json names the classes
```
"""
    return f"""The head was trained on mean-pooled tokens (`model.pooling=mean`), which no Transformers class computes
(BERT's classifier reads its pooler over the first token), and fedtune ships no remote code. This directory
holds the merged encoder (`AutoModel`, without BERT's pooler, which the head never read) and the head in
`{HEAD_FILE}`; these lines give the logits of `texts`:

```python
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(model_dir)
encoder = AutoModel.from_pretrained(model_dir, add_pooling_layer=False).eval()
head = load_file(f"{{model_dir}}/{HEAD_FILE}")
batch = tokenizer(texts, padding=True, truncation=True, max_length={max_length}, return_tensors="pt")
with torch.no_grad():
    hidden = encoder(**batch).last_hidden_state
mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
pooled = ((hidden * mask).sum(1) / mask.sum(1)).float()  # the head is float32
logits = pooled @ head["weight"].T + head["bias"]
labels = [encoder.config.id2label[i] for i in logits.argmax(-1).tolist()]
```
"""
