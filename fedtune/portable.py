"""A portable adapter: its files name the base model by its public Hugging Face id, never by a path.

PEFT writes the base model's ``name_or_path`` into ``adapter_config.json`` (``base_model_name_or_path``) and
into its README's metadata: for fedtune that is the training machine's directory (a site-packages path for
a built-in), which no other machine has, so ``AutoPeftModel...from_pretrained("adapter")`` fails anywhere
else. The run's adapter names instead the public id (:func:`public_base`): a built-in's upstream id, the
``model.public_name`` a user gives, or the Hub id a local model's config.json records. Where none is known
it names no base model (null) rather than a path. The model card records the training machine's path and
the base files' fingerprint (fedtune/model_fingerprint.py), so that a copy can be checked.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from peft import PeftConfig, PeftModel

from fedtune import model_fingerprint
from fedtune.models import ModelSpec, is_hub_id

logger = logging.getLogger("fedtune")


@dataclass(frozen=True)
class PublicBase:
    """The base model's public name, and where it comes from.

    Attributes:
        name: A Hugging Face Hub id, or None when none is known.
        source: Where the name comes from (or why there is none), for the model card.
    """

    name: str | None
    source: str


def public_base(spec: ModelSpec) -> PublicBase:
    """The public name of ``spec``'s base model: a built-in's upstream id, ``model.public_name``, else the Hub id
    its config.json records as ``_name_or_path`` (where the model was loaded from before it was saved: if its
    weights were changed since, ``model.public_name`` names them)."""
    if spec.builtin is not None:
        return PublicBase(spec.builtin.hub_id, f"the upstream id of `{spec.path}`")
    if spec.public_name is not None:
        return PublicBase(spec.public_name, "as `model.public_name` names it")
    recorded = json.loads((spec.resolve() / "config.json").read_text()).get("_name_or_path")
    if isinstance(recorded, str) and is_hub_id(recorded):
        return PublicBase(
            recorded,
            "as its config.json records it (`_name_or_path`: where the model was loaded from before it was saved; "
            "set `model.public_name` if that is not where these weights are published)",
        )
    return PublicBase(
        None,
        "its config.json records no Hub id, so `adapter/adapter_config.json` names no base model: pass the base "
        "model to PEFT yourself, or set `model.public_name=namespace/name` for the next run",
    )


def warn_if_unnamed(spec: ModelSpec) -> None:
    """At the start of a run: say that its adapter will name no base model, and how to give it one."""
    if public_base(spec).name is None:
        logger.warning(
            "model.path=%s records no Hugging Face id (_name_or_path in its config.json): the exported adapter "
            "will name no base model. Set model.public_name=namespace/name to name it.",
            spec.path,
        )


def save_adapter(model: PeftModel, directory: Path, spec: ModelSpec, card: str) -> None:
    """PEFT's adapter files in ``directory``, naming the base model by :func:`public_base`, with ``card`` as their
    README under the Hub's metadata (PEFT's own README template would name the path too)."""
    model.save_pretrained(directory)
    name = public_base(spec).name
    config = PeftConfig.from_pretrained(directory)
    config.base_model_name_or_path = name
    config.save_pretrained(directory)
    (directory / "README.md").write_text(front_matter(name, "peft") + card, encoding="utf-8")


def front_matter(base_model: str | None, library: str) -> str:
    """The Hugging Face Hub's model-card metadata: the base model (when known) and the library that loads it."""
    base = f"base_model: {base_model}\n" if base_model is not None else ""
    return f"---\n{base}library_name: {library}\ntags:\n- fedtune\n---\n\n"


def loading_section(spec: ModelSpec, num_labels: int | None) -> str:
    """The model card's loading instructions: PEFT on a base model in hand and, where the adapter names its base,
    PEFT's auto class from the Hub or the Hugging Face cache (for a mean-pooling classifier: the base model
    by that name, given the pooling first)."""
    public = public_base(spec).name
    if spec.pooling == "mean":
        return _mean_pooling_loading(public, num_labels)
    auto = ""
    if public is not None:
        name, arguments = (
            ("AutoPeftModelForSequenceClassification", f", num_labels={num_labels}")
            if spec.task == "classification"
            else ("AutoPeftModelForCausalLM", "")
        )
        auto = f"""
# or the base model as adapter_config.json names it ({public}), from the Hub or your Hugging Face cache:
from peft import {name}
model = {name}.from_pretrained("adapter"{arguments})"""
    return f"""Load it with PEFT:

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_model, "adapter"){auto}
```
"""


def _mean_pooling_loading(public: str | None, num_labels: int | None) -> str:
    """For a classifier trained with mean pooling: the base model needs it too before the adapter loads."""
    base = f'"{public}"' if public is not None else '"/path/to/the/base/model"'
    return f"""The head was trained on mean-pooled tokens (`model.pooling=mean`: the mean of the last hidden states
over the real tokens). A plain Transformers classifier (and so `AutoPeftModelForSequenceClassification`)
reads BERT's pooler over the first token instead and gives other predictions: load it with PEFT on a base
model given the same pooling,

```python
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
from fedtune.models import use_mean_pooling

base_model = AutoModelForSequenceClassification.from_pretrained({base}, num_labels={num_labels})
use_mean_pooling(base_model)
model = PeftModel.from_pretrained(base_model, "adapter")
```

or export it merged, `fedtune export <run dir> --merged OUT`: the encoder, the head and the lines that apply
them, in plain Transformers.
"""


def base_model_section(spec: ModelSpec) -> str:
    """The model card's "Base model" section: the public name, and the files the adapter was trained on (the
    training machine's path and their fingerprint)."""
    public = public_base(spec)
    directory = spec.resolve()
    named = f"`{public.name}`" if public.name is not None else "No public name"
    checked = "`fedtune evaluate` and the nodes check it"
    weights = ""
    if spec.builtin is not None:
        checked = "`fedtune evaluate` and the nodes check the built-in's name; the pinned package fixes its files"
        weights = f"\n- These files are {spec.builtin.weights}." if spec.builtin.weights else ""
    return f"""## Base model
- {named} ({spec.task}; licence: {spec.licence()}): {public.source}.
- Trained on the files at `{directory}` (`model.path={spec.path}`) on the training machine, fingerprint
  `sha256:{model_fingerprint.fingerprint(directory)}` (weights, config, tokenizer: every file but READMEs and
  licences): use the adapter only on these files ({checked}).{weights}
"""
