"""Local training on one client: tokenisation, batches, and the training loop, written out."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from fedtune.data import Task

IGNORE_INDEX = -100  # label value that the loss skips (prompt and padding tokens)


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings (config group ``train``).

    Args:
        local_steps: Optimizer steps each sampled client takes per round.
        batch_size: Examples per step.
        lr: AdamW learning rate for the adapter.
        weight_decay: AdamW weight decay.
        eval_batch_size: Examples per forward pass during evaluation.
        eval_max_examples: Evaluate on at most this many examples of a split (the first ones; 0 = all).
        generation_examples: Causal LM only: examples of the exact-match generation check.
        torch_threads: CPU threads each client uses (simulated clients run side by side).

    Raises:
        ValueError: If a value is out of range; the message names the key.
    """

    local_steps: int = 40
    batch_size: int = 16
    lr: float = 5e-3
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    eval_max_examples: int = 500
    generation_examples: int = 32
    torch_threads: int = 1

    def __post_init__(self) -> None:
        positive = ("local_steps", "batch_size", "lr", "eval_batch_size", "torch_threads")
        for key in positive:
            if not getattr(self, key) > 0:
                raise ValueError(f"train.{key}={getattr(self, key)}: must be positive.")
        for key in ("weight_decay", "eval_max_examples", "generation_examples"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}={getattr(self, key)}: must not be negative.")


def encode(
    rows: dict[str, list[Any]], task: Task, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, torch.Tensor]:
    """Tokenise a batch of rows into model inputs, right-padded.

    Classification: ``input_ids``, ``attention_mask`` of shape (B, T) and ``labels`` of shape (B,).
    Causal LM: the prompt (chat-formatted when the tokenizer has a template) followed by the response;
    ``labels`` (B, T) copy the response tokens and hold IGNORE_INDEX elsewhere, so only the answer is learned.
    """
    if task == "classification":
        batch = tokenizer(rows["text"], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor(rows["label"], dtype=torch.long)
        return dict(batch)
    sequences, label_rows = [], []
    for prompt, response in zip(rows["prompt"], rows["response"], strict=True):
        prompt_ids = tokenizer(format_prompt(prompt, tokenizer), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + response_ids)[:max_length]
        sequences.append(ids)
        label_rows.append(([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length])
    width = max(len(ids) for ids in sequences)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids in sequences]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in sequences]),
        "labels": torch.tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for labels in label_rows]),
    }


def format_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt as the model expects it: through its chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        )
    return f"{prompt}\n"


def sample_batches(
    dataset: datasets.Dataset, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[dict[str, list[Any]]]:
    """``steps`` batches drawn by shuffling the dataset epoch after epoch (deterministic under ``generator``)."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(dataset), generator=generator).tolist()
        indices, order = order[:batch_size], order[batch_size:]
        yield dataset[indices]


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
    """Per-example loss, shape (B,): cross-entropy for classification, mean next-token loss over answer tokens."""
    if task == "classification":
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shifted_labels.shape)
    counts = (shifted_labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def local_train(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    config: TrainConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """Train the model's trainable (adapter) parameters for ``config.local_steps`` steps.

    Returns:
        ``train_loss``: mean loss over the steps; ``train_loss_last``: loss of the last step.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    model.train()
    losses = []
    for rows in sample_batches(dataset, config.batch_size, config.local_steps, generator):
        batch = encode(rows, task, tokenizer, max_length)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        loss = sequence_loss(logits, labels, task).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return {"train_loss": sum(losses) / len(losses), "train_loss_last": losses[-1]}
