"""Local training on one client: tokenisation, batches, and the training loop, written out."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import torch
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from fedtune import devices
from fedtune.privacy import LocalPlan, NoPrivacy, PlanRequest, PrivacyMechanism
from fedtune.tasks import Task

logger = logging.getLogger(__name__)
PROGRESS_LOG_SECONDS = 30.0  # a local round that runs longer says every this often how far it is
PROGRESS_BAR_LOSS_SECONDS = 1.0  # the bar reads the loss at most this often (a read waits for the GPU)

if TYPE_CHECKING:  # a type only: training needs no dataset library (GPU machines run it without one)
    import datasets

IGNORE_INDEX = -100  # label value that the loss skips (prompt and padding tokens)
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings (config group ``train``).

    Args:
        local_steps: Optimizer steps each sampled client takes per round.
        batch_size: Examples per step (the expected number under DP-SGD's Poisson sampling).
        physical_batch_size: Examples per forward and backward pass (0: the whole batch at once). A larger
            step's batch is split into passes of this size whose gradients add up to the step's, under DP
            each record still clipped alone and the noise added once: memory stays bounded at any batch size.
        lr: AdamW learning rate for the adapter (the peak, with a schedule).
        lr_schedule: ``constant``, or ``cosine``: the rate follows a cosine from ``lr`` to 0 over the whole
            run's local steps (round after round, as a centralized trainer's would over its steps; the
            FlowerTune baselines anneal across rounds too).
        weight_decay: AdamW weight decay.
        eval_batch_size: Examples per forward pass during evaluation.
        eval_max_examples: Evaluate on at most this many examples of a split (the first ones; 0 = all).
        generation_examples: Causal LM only: examples of the exact-match generation check.
        torch_threads: CPU threads each client uses (simulated clients run side by side).
        device: Where each node trains and evaluates: ``auto`` (its CUDA GPU if it has one, else its CPU),
            ``cpu``, ``cuda`` or ``cuda:N``. Resolved on each node's own hardware (fedtune/devices.py).
        precision: ``fp32``, or ``bf16``: base weights stored in bfloat16 and the forward pass autocast to it
            (the adapter, its gradients and the optimizer stay float32).
        deterministic: On CUDA, use only deterministic kernels so that a run repeats bit for bit; an
            operation without one then raises. False allows it, and gives up exact repeats on the GPU.

    Raises:
        ValueError: If a value is out of range; the message names the key.
    """

    local_steps: int = 40
    batch_size: int = 16
    physical_batch_size: int = 0
    lr: float = 5e-3
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    eval_max_examples: int = 500
    generation_examples: int = 32
    torch_threads: int = 1
    device: str = "auto"
    precision: str = "fp32"
    deterministic: bool = True

    def __post_init__(self) -> None:
        positive = ("local_steps", "batch_size", "lr", "eval_batch_size", "torch_threads")
        for key in positive:
            if not getattr(self, key) > 0:
                raise ValueError(f"train.{key}={getattr(self, key)}: must be positive.")
        for key in ("weight_decay", "eval_max_examples", "generation_examples", "physical_batch_size"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}={getattr(self, key)}: must not be negative.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"train.lr_schedule={self.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}.")
        devices.check_device_name(self.device)
        if self.precision not in devices.PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r}: use one of {', '.join(devices.PRECISIONS)}.")


def encode(
    rows: dict[str, list[Any]],
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenise a batch of rows into model inputs, right-padded.

    Classification: ``input_ids``, ``attention_mask`` of shape (B, T) and ``labels`` of shape (B,).
    Causal LM: the prompt (chat-formatted when the tokenizer has a template) followed by the response;
    ``labels`` (B, T) copy the response tokens and hold IGNORE_INDEX elsewhere, so only the answer is learned.
    Plain text: each document's tokens (:func:`document_ids`) cut to ``max_length``; ``labels`` copy them all
    and hold IGNORE_INDEX on the padding only. The tensors are moved to ``device`` when one is given.
    """
    batch = _encode(rows, task, tokenizer, max_length)
    return batch if device is None else {key: value.to(device) for key, value in batch.items()}


def _encode(
    rows: dict[str, list[Any]], task: Task, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, torch.Tensor]:
    if task == "classification":
        batch = tokenizer(rows["text"], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor(rows["label"], dtype=torch.long)
        return dict(batch)
    if task == "plain_text":
        sequences = [ids[:max_length] for ids in document_ids(rows["text"], tokenizer)]
        return _padded(sequences, sequences, tokenizer.pad_token_id)
    sequences, label_rows = [], []
    for prompt, response in zip(rows["prompt"], rows["response"], strict=True):
        prompt_ids = tokenizer(format_prompt(prompt, tokenizer), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + response_ids)[:max_length]
        sequences.append(ids)
        label_rows.append(([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length])
    return _padded(sequences, label_rows, tokenizer.pad_token_id)


def _padded(sequences: list[list[int]], label_rows: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded token ids, attention mask and labels (IGNORE_INDEX on the padding: the pad token may be the
    end-of-sequence token, which is learned where it is real)."""
    width = max(len(ids) for ids in sequences)
    return {
        "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids in sequences]),
        "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in sequences]),
        "labels": torch.tensor([labels + [IGNORE_INDEX] * (width - len(labels)) for labels in label_rows]),
    }


def document_ids(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Plain-text documents as training reads them, before truncation: each text as it is (no chat template, no
    special tokens in front) followed by the end-of-sequence token, so that the model learns where a document ends."""
    return tokenizer([text + (tokenizer.eos_token or "") for text in texts], add_special_tokens=False)["input_ids"]


def truncated_documents(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> int:
    """How many plain-text documents are longer than ``max_length`` tokens: training and evaluation read only
    their first ``max_length`` tokens (the partition summary reports the count)."""
    return sum(len(ids) > max_length for ids in document_ids(texts, tokenizer))


def format_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt as the model expects it: through its chat template when it has one."""
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        )
    return f"{prompt}\n"


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor, task: Task) -> torch.Tensor:
    """Per-example loss, shape (B,): cross-entropy for classification; for a causal LM the mean next-token loss
    over the tokens ``labels`` keep (the answer's, or every token of a plain-text document)."""
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
    privacy: PrivacyMechanism | None = None,
    total_steps: int | None = None,
    privacy_state: dict[str, Any] | None = None,
    proximal_mu: float = 0.0,
    first_step: int = 0,
) -> dict[str, float]:
    """Train the model's trainable (adapter) parameters for ``config.local_steps`` steps, on the model's device.

    Args:
        privacy: The privacy mechanism that plans batches, optimizer and per-record gradients (none if None).
        total_steps: Local steps planned for this client over the whole run (DP calibrates noise for them,
            and the learning-rate schedule spans them).
        privacy_state: The client's persistent privacy state (DP accounting), updated in place.
        proximal_mu: FedProx's mu (see :func:`add_proximal_term`); 0 trains on the loss alone.
        first_step: Where this round's first step lies among the ``total_steps`` (the schedule's position).

    Returns:
        ``train_loss``: mean loss over the non-empty steps; ``train_loss_last``: loss of the last one; plus
        what the privacy mechanism reports (epsilon spent...).
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    request = PlanRequest(
        model, optimizer, len(dataset), config.batch_size, config.local_steps, total_steps or config.local_steps,
        generator, {} if privacy_state is None else privacy_state,
    )  # fmt: skip
    plan = (privacy or NoPrivacy()).plan(request)
    proximal = add_proximal_term(optimizer, proximal_mu) if proximal_mu > 0 else None
    device = devices.of(model)
    rates = iter(learning_rates(config, first_step, total_steps or config.local_steps))
    model.train()
    losses: list[torch.Tensor] = []
    progress = _Progress(config.local_steps)
    try:
        for indices in plan.batches:
            for group in optimizer.param_groups:  # the DP wrappers step this optimizer's groups
                group["lr"] = next(rates)
            # Poisson sampling can draw an empty batch: the step still adds (and accounts) noise
            physical = config.physical_batch_size or max(1, len(indices))
            batches = [
                encode(dataset[indices[start : start + physical]], task, tokenizer, max_length, device)
                for start in range(0, len(indices), physical)
            ]
            loss = train_step(plan, batches, task, config.precision)
            if loss is not None:
                losses.append(loss)
            progress.step(losses[-1] if losses else None)
    finally:
        progress.close()
        if proximal is not None:
            proximal.remove()
        plan.close()
        model.eval()
    values = torch.stack(losses).tolist() if losses else [float("nan")]
    return {"train_loss": sum(values) / len(values), "train_loss_last": values[-1], **plan.report()}


class _Progress:
    """A long local round's progress (a real model's round takes minutes): a bar when the node runs in an
    interactive terminal (``stream``, default stderr, is a TTY), else a log line every PROGRESS_LOG_SECONDS
    with the step, the time so far and left, and the last loss (a round shorter than that logs nothing)."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        stream = stream or sys.stderr
        self.total, self.done, self.started, self.next_at = total, 0, time.monotonic(), PROGRESS_LOG_SECONDS
        # A Ray actor's or a service's stderr is a pipe or a file, where every redraw would be a line of its own
        self.bar = (
            tqdm(total=total, desc="local steps", unit="step", file=stream, leave=False) if stream.isatty() else None
        )
        self.loss_read_at = -PROGRESS_BAR_LOSS_SECONDS

    def step(self, loss: torch.Tensor | None) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        if self.bar is not None:
            if loss is not None and elapsed - self.loss_read_at >= PROGRESS_BAR_LOSS_SECONDS:
                self.loss_read_at = elapsed
                self.bar.set_postfix(loss=f"{loss.item():.4f}")  # redraws now: a fast round may never redraw again
            self.bar.update(1)
            return
        if elapsed < self.next_at:
            return
        self.next_at = elapsed + PROGRESS_LOG_SECONDS
        left = elapsed / self.done * (self.total - self.done)
        last = f", last loss {loss.item():.4f}" if loss is not None else ""
        logger.info("local step %d/%d, %.0f s, about %.0f s left%s", self.done, self.total, elapsed, left, last)

    def close(self) -> None:
        """Take the bar off the terminal (the round's result is logged next)."""
        if self.bar is not None:
            self.bar.close()


def learning_rates(config: TrainConfig, first_step: int, total_steps: int) -> list[float]:
    """The learning rate of each of this round's ``config.local_steps`` steps, from step ``first_step`` of
    ``total_steps`` (cosine: ``lr (1 + cos(pi t / total_steps)) / 2`` at step t)."""
    steps = range(first_step, first_step + config.local_steps)
    if config.lr_schedule == "constant":
        return [config.lr for _ in steps]
    return [config.lr * (1 + math.cos(math.pi * min(t, total_steps) / total_steps)) / 2 for t in steps]


def add_proximal_term(optimizer: torch.optim.Optimizer, mu: float) -> RemovableHandle:
    """FedProx's proximal term (Li et al. 2020, https://arxiv.org/abs/1812.06127): minimise the loss plus
    ``mu/2 ||w - w0||^2``, with ``w0`` the parameters as they are now (the global adapter).

    The term's gradient ``mu (w - w0)`` is added to each parameter's gradient just before ``optimizer``
    applies it, so under DP-SGD it is added after the per-record gradients were clipped and noised: it
    depends on no record, so it is post-processing and costs no privacy, and per-record clipping is
    unchanged. Returns the handle that removes it.
    """
    anchors = [(p, p.detach().clone()) for group in optimizer.param_groups for p in group["params"]]

    def add_gradient(*_: Any) -> None:
        with torch.no_grad():
            for parameter, anchor in anchors:
                if parameter.grad is not None:
                    parameter.grad.add_(parameter - anchor, alpha=mu)

    return optimizer.register_step_pre_hook(add_gradient)


def train_step(
    plan: LocalPlan, batches: list[dict[str, torch.Tensor]], task: Task, precision: str
) -> torch.Tensor | None:
    """One optimizer step of ``plan`` over one batch, given as its encoded physical batches (none: an empty
    Poisson batch, which still steps); returns the batch's mean loss (None if empty).

    The loss stays a tensor on the device: reading it here would make the CPU wait for the GPU every step.
    """
    records = sum(len(batch["labels"]) for batch in batches)
    total = None
    for index, batch in enumerate(batches):
        inputs = dict(batch)
        labels, input_ids = inputs.pop("labels"), inputs.pop("input_ids")
        with devices.autocast(input_ids.device, precision):
            per_record = sequence_loss(plan.module(input_ids, **inputs).logits, labels, task)
        summed = per_record.detach().sum()
        total = summed if total is None else total + summed
        plan.backward(per_record, len(labels) / records)
        if index < len(batches) - 1:
            plan.accumulate()
    plan.optimizer.step()
    plan.optimizer.zero_grad(set_to_none=True)
    return None if total is None else total / records
