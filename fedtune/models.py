"""Model builders: a Hugging Face base model from a local path or a built-in, wrapped with a PEFT LoRA adapter.

The frozen base is expensive to load, so each process builds a model once per (spec, LoRA config,
labels) and reuses it: between rounds only the adapter tensors are overwritten (see adapters.py).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from fedtune import devices
from fedtune.adapters import AdapterState, get_adapter
from fedtune.assets import BUILTIN_MODELS, BUILTIN_PREFIX, BuiltinModel
from fedtune.tasks import Task

logger = logging.getLogger(__name__)

POOLINGS = ("cls", "mean")
# A Hugging Face Hub model id, ``namespace/name``: what a portable adapter may name as its base model.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
# plain_text trains the same causal LM as causal_lm; only its data, loss mask and metrics differ (fedtune/tasks.py)
_TASK_TYPES = {"classification": TaskType.SEQ_CLS, "causal_lm": TaskType.CAUSAL_LM, "plain_text": TaskType.CAUSAL_LM}
# transformers 5 deprecation that PEFT triggers on every forward; nothing for users to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
_MODEL_CACHE: dict[str, tuple[PeftModel, AdapterState]] = {}
_TOKENIZER_CACHE: dict[str, PreTrainedTokenizerBase] = {}


@dataclass(frozen=True)
class ModelSpec:
    """Which base model to fine-tune (config group ``model``).

    Args:
        path: A local Hugging Face model directory, or ``builtin:minilm`` / ``builtin:smollm2``.
        task: What the adapter is trained for (fedtune/tasks.py): ``classification`` (sequence classifier
            head), ``causal_lm`` (a causal LM answering prompts) or ``plain_text`` (a causal LM continuing
            documents). The data must be of the same task; the run's commands (evaluate, predict, export)
            read it from here.
        max_length: Inputs are truncated to this many tokens.
        pooling: What a classifier's head reads: ``cls``, the model's own pooler over the first token (as
            Hugging Face builds it), or ``mean``, the mean of the last hidden states over the real tokens
            (what sentence-embedding models such as all-MiniLM-L6-v2 were trained to produce; see
            :func:`use_mean_pooling`).
        public_name: The base model's public Hugging Face id (``namespace/name``), which the exported adapter
            names as its base instead of this machine's path (fedtune/portable.py); unset, a local model is
            named by the id its config.json records (``_name_or_path``), if it records one. A built-in is
            always named by its upstream id. Not part of the experiment hash: it trains nothing.

    Raises:
        ValueError: Unknown built-in, missing directory, unknown task or pooling, a non-positive length, or a
            public name that is not a Hub id (or is given for a built-in).
    """

    path: str
    task: Task = "classification"
    max_length: int = 128
    pooling: str = "cls"
    public_name: str | None = None

    def __post_init__(self) -> None:
        if self.task not in _TASK_TYPES:
            raise ValueError(f"model.task={self.task!r}: must be one of {sorted(_TASK_TYPES)}.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"model.pooling={self.pooling!r}: use one of {', '.join(POOLINGS)}.")
        if self.pooling != "cls" and self.task != "classification":
            raise ValueError(f"model.pooling={self.pooling} applies to classifiers; a causal LM has no pooled output.")
        if self.max_length < 8:
            raise ValueError(f"model.max_length={self.max_length}: must be at least 8 tokens.")
        if self.path.startswith(BUILTIN_PREFIX):
            name = self.path.removeprefix(BUILTIN_PREFIX)
            if name not in BUILTIN_MODELS:
                raise ValueError(
                    f"model.path={self.path!r}: unknown built-in; available: {', '.join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)}."
                )
        elif not (Path(self.path) / "config.json").is_file():
            raise ValueError(
                f"model.path={self.path!r} is not a Hugging Face model directory (no config.json). Point it at a "
                "local directory saved with save_pretrained; fedtune never downloads models. A SuperNode whose "
                "copy lies elsewhere names it in its node config: model-path='/path/to/copy'."
            )
        if self.public_name is not None:
            if self.path.startswith(BUILTIN_PREFIX):
                raise ValueError(
                    f"model.public_name={self.public_name!r}: {self.path} is always named by its upstream id; "
                    "leave model.public_name unset."
                )
            if not is_hub_id(self.public_name):
                raise ValueError(
                    f"model.public_name={self.public_name!r} is not a Hugging Face model id (namespace/name, e.g. "
                    "dmis-lab/biobert-v1.1): the exported adapter names its base model by it."
                )

    @property
    def builtin(self) -> BuiltinModel | None:
        """The built-in model that ``path`` names (None for a local directory)."""
        if not self.path.startswith(BUILTIN_PREFIX):
            return None
        return BUILTIN_MODELS[self.path.removeprefix(BUILTIN_PREFIX)]

    def resolve(self) -> Path:
        """The model directory on this machine (converting a built-in once if needed)."""
        return self.builtin.directory() if self.builtin is not None else Path(self.path)

    def licence(self) -> str:
        """The base model's licence, for the model card."""
        return self.builtin.licence if self.builtin is not None else "not known to fedtune (check your base model's)"


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hugging Face Hub model id, ``namespace/name`` (an absolute path, a
    ``./`` path or one of several folders does not; a two-part relative path cannot be told from an id)."""
    return _HUB_ID.fullmatch(name) is not None and ".." not in name and "--" not in name


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The base model's tokenizer, with a padding token (cached per process)."""
    key = str(spec.resolve())
    if key not in _TOKENIZER_CACHE:
        tokenizer = AutoTokenizer.from_pretrained(key)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        _TOKENIZER_CACHE[key] = tokenizer
    return _TOKENIZER_CACHE[key]


def build_model(
    spec: ModelSpec,
    lora: LoraConfig,
    num_labels: int | None,
    seed: int,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> tuple[PeftModel, AdapterState]:
    """The base model with a LoRA adapter, on ``device``, and that adapter's initial values (on the CPU).

    Built once per process for the same arguments and reused: the model's adapter tensors are whatever
    its last user set, so callers load an adapter (:func:`fedtune.adapters.set_adapter`) before use.
    The initial adapter (and a new classifier head) depends on ``seed`` (and ``precision``) only: it is
    drawn on the CPU before the model moves, so the server's first global adapter is the same on any device.

    Args:
        spec: The base model.
        lora: PEFT LoRA settings; ``task_type`` is set from ``spec.task``.
        num_labels: Classes of the classification head (``None`` for a causal LM).
        seed: Seeds the adapter and head initialisation.
        device: Where the model runs.
        precision: ``fp32``, or ``bf16`` to store the frozen base weights in bfloat16. Trainable tensors
            (LoRA matrices, a classifier head) are float32 either way.
    """
    lora = _with_task_type(lora, spec.task)
    key = json.dumps(
        [spec.path, spec.task, spec.pooling, num_labels, seed, _lora_key(lora), str(device), precision], sort_keys=True
    )
    if key not in _MODEL_CACHE:
        model = _build(spec, lora, num_labels, seed, devices.weights_dtype(precision))
        initial = get_adapter(model)
        _MODEL_CACHE[key] = (model.to(device), initial)
    return _MODEL_CACHE[key]


class MeanPooler(torch.nn.Module):
    """In place of a BERT-style pooler: the mean of the last hidden states over the tokens the attention mask
    keeps (no parameters). The encoder's forward pre-hook :meth:`capture_mask` hands it each batch's mask."""

    def __init__(self) -> None:
        super().__init__()
        self._mask: torch.Tensor | None = None

    def capture_mask(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Keep the attention mask of the encoder call that is starting (None: every token counts)."""
        self._mask = kwargs.get("attention_mask")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, hidden) -> (batch, hidden): each record's mean over its real tokens."""
        mask, self._mask = self._mask, None
        if mask is None:
            return hidden_states.mean(dim=1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def use_mean_pooling(model: transformers.PreTrainedModel) -> None:
    """Make a BERT-style sequence classifier's head read the mean of its last hidden states over the real
    tokens instead of its pooler's transform of the first token. Apply it to the base model before loading
    an adapter trained with ``model.pooling=mean`` (the model card says so).

    Raises:
        ValueError: The model has no pooler to replace (e.g. RoBERTa's classifier reads the first token
            itself): use ``model.pooling=cls``.
    """
    encoder = getattr(model, model.base_model_prefix, None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        raise ValueError(
            f"model.pooling=mean replaces a BERT-style pooler, and {type(model).__name__} has none; use model.pooling=cls."
        )
    pooler = MeanPooler()
    encoder.pooler = pooler
    encoder.register_forward_pre_hook(pooler.capture_mask, with_kwargs=True)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _build(spec: ModelSpec, lora: LoraConfig, num_labels: int | None, seed: int, dtype: torch.dtype) -> PeftModel:
    path = spec.resolve()
    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    torch.manual_seed(seed)
    if spec.task == "classification":
        if not num_labels or num_labels < 2:
            raise ValueError(f"A classification model needs at least 2 labels, got {num_labels}.")
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype)
        base.config.pad_token_id = load_tokenizer(spec).pad_token_id
        if spec.pooling == "mean":
            use_mean_pooling(base)
    else:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    base.eval()
    model = get_peft_model(base, lora)
    for parameter in model.parameters():
        if parameter.requires_grad:  # what trains and travels is float32 (a bfloat16 base's copied head too)
            parameter.data = parameter.data.float()
    trainable, total = count_parameters(model)
    logger.info("Built %s + LoRA: %d trainable of %d parameters", path.name, trainable, total)
    return model


def _with_task_type(lora: LoraConfig, task: Task) -> LoraConfig:
    values: dict[str, Any] = {k: v for k, v in lora.to_dict().items() if k in LoraConfig.__dataclass_fields__}
    values["task_type"] = _TASK_TYPES[task]
    values.pop("peft_type", None)
    return LoraConfig(**values)


def _lora_key(lora: LoraConfig) -> str:
    return json.dumps(lora.to_dict(), sort_keys=True, default=str)
