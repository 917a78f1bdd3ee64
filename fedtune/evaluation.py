"""Evaluation of a model on a split: classification (accuracy, macro-F1), causal LM (loss, perplexity, exact
match, and answer accuracy where the task has a closed set of answers) and plain text (loss, perplexity)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from fedtune import devices
from fedtune.tasks import Task
from fedtune.training import IGNORE_INDEX, TrainConfig, encode, format_prompt, sequence_loss

if TYPE_CHECKING:  # a type only, as in training.py
    import datasets

TOKENS = "num_tokens"  # a client's evaluated tokens, beside num_examples: what weighs its loss among clients'


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y_true`` or ``y_pred``."""
    classes = set(y_true) | set(y_pred)
    scores = []
    for c in classes:
        tp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == c and p == c)
        fp = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t != c and p == c)
        fn = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == c and p != c)
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def majority_baseline(train_labels: Sequence[int], test_labels: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1 of always predicting the most frequent training label."""
    majority = Counter(train_labels).most_common(1)[0][0]
    predictions = [majority] * len(test_labels)
    accuracy = sum(1 for t in test_labels if t == majority) / len(test_labels)
    return {"accuracy": accuracy, "macro_f1": macro_f1(test_labels, predictions)}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: datasets.Dataset,
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    config: TrainConfig,
    answers: Sequence[str] | None = None,
) -> dict[str, float]:
    """Metrics of ``model`` on (the first ``config.eval_max_examples`` rows of) ``dataset``, on the model's device.

    ``answers``: a causal LM task's closed set of answers (every response is one of them), if it has one.

    Returns:
        Classification: ``loss``, ``accuracy``, ``macro_f1``. Causal LM: ``loss`` (mean per answer token),
        ``perplexity`` (its exp), ``exact_match`` of greedy generations on the first ``generation_examples``
        rows and, given ``answers``, ``answer_accuracy`` on the same rows (:func:`answer_accuracy`). Plain
        text: ``loss`` (mean over every predicted token of the documents) and ``perplexity``; a document has no
        reference answer to match.
    """
    if config.eval_max_examples and len(dataset) > config.eval_max_examples:
        dataset = dataset.select(range(config.eval_max_examples))
    model.eval()
    device = devices.of(model)
    loss_sum, loss_count, y_true, y_pred = 0.0, 0, [], []
    for start in range(0, len(dataset), config.eval_batch_size):
        batch = encode(dataset[start : start + config.eval_batch_size], task, tokenizer, max_length, device)
        labels = batch.pop("labels")
        with devices.autocast(device, config.precision):
            logits = model(**batch).logits
            losses = sequence_loss(logits, labels, task)
        if task == "classification":
            loss_sum, loss_count = loss_sum + losses.sum().item(), loss_count + len(losses)
            y_true += labels.tolist()
            y_pred += logits.argmax(dim=-1).tolist()
        else:
            tokens = predicted_tokens(labels)
            loss_sum, loss_count = loss_sum + (losses * tokens).sum().item(), loss_count + int(tokens.sum())
    loss = loss_sum / max(loss_count, 1)
    if task == "classification":
        accuracy = sum(1 for t, p in zip(y_true, y_pred, strict=True) if t == p) / max(len(y_true), 1)
        return {"loss": loss, "accuracy": accuracy, "macro_f1": macro_f1(y_true, y_pred)}
    metrics = {"loss": loss, "perplexity": perplexity(loss)}
    if task == "causal_lm" and config.generation_examples:
        checked = dataset.select(range(min(len(dataset), config.generation_examples)))
        with devices.autocast(device, config.precision):
            metrics["exact_match"] = exact_match(model, checked, tokenizer)
            if answers:
                metrics["answer_accuracy"] = answer_accuracy(model, checked, tokenizer, answers)
    return metrics


def perplexity(loss: float) -> float:
    """exp of a mean token loss (capped: an untrained model's loss must not overflow the metrics)."""
    return math.exp(min(loss, 50.0))


def predicted_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Per row of a causal LM's ``labels`` (B, T): how many tokens its loss averages over (each is predicted from
    the ones before it, so the first never is)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)


def evaluated_tokens(
    dataset: datasets.Dataset, task: Task, tokenizer: PreTrainedTokenizerBase, max_length: int, config: TrainConfig
) -> int:
    """How many tokens :func:`evaluate` averages a causal LM's loss over on ``dataset`` (its evaluated rows)."""
    rows, total = min(len(dataset), config.eval_max_examples or len(dataset)), 0
    for start in range(0, rows, config.eval_batch_size):
        batch = dataset[start : min(start + config.eval_batch_size, rows)]
        total += int(predicted_tokens(encode(batch, task, tokenizer, max_length)["labels"]).sum())
    return total


def federated_metrics(results: list[dict[str, float]], averaged: dict[str, float]) -> dict[str, float]:
    """``averaged``, the clients' metrics averaged by examples, with a causal LM's ``loss`` taken over every
    token the clients evaluated (each client's weighted by its ``num_tokens``), as one evaluation of all their
    rows gives, and ``perplexity`` its exp. Clients that withhold their sizes (secure aggregation) count
    equally: ``perplexity`` is then the exp of their mean loss."""
    if "perplexity" not in averaged:
        return averaged
    loss = averaged["loss"]
    if results and all(TOKENS in result for result in results):
        tokens = sum(result[TOKENS] for result in results)
        loss = sum(result["loss"] * result[TOKENS] for result in results) / max(tokens, 1.0)
    return {**averaged, "loss": loss, "perplexity": perplexity(loss)}


@torch.no_grad()
def exact_match(model: torch.nn.Module, dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> float:
    """Fraction of rows whose greedy answer equals the reference response (whitespace-trimmed)."""
    hits = 0
    for row in dataset:
        budget = len(tokenizer(row["response"], add_special_tokens=False)["input_ids"]) + 4
        answer = generate(model, tokenizer, row["prompt"], "causal_lm", budget)
        hits += int(answer.strip() == row["response"].strip())
    return hits / max(len(dataset), 1)


@torch.no_grad()
def answer_accuracy(
    model: torch.nn.Module, dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, answers: Sequence[str]
) -> float:
    """Fraction of rows whose reference response is, of the task's closed set of ``answers``, the one the model
    finds most likely after the prompt (whole answer and end of sequence; the multiple-choice scoring of LM
    evaluation suites).

    Greedy exact match follows the most probable token at each step, not the most probable answer: where many
    answers share their first words (15 of the 22 ICD-10 chapter names begin "Diseases of the"), a model that
    spreads its belief over several answers starts with the shared words and ends in the wrong answer, even
    when the right one is its single most probable. This metric measures which answer the model believes.
    """
    hits = 0
    for row in dataset:
        best = int(answer_log_likelihoods(model, tokenizer, row["prompt"], answers).argmax())
        hits += int(answers[best].strip() == row["response"].strip())
    return hits / max(len(dataset), 1)


@torch.no_grad()
def answer_log_likelihoods(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, answers: Sequence[str]
) -> torch.Tensor:
    """log P(answer, then the end-of-sequence token | prompt) for each of ``answers``, shape (len(answers),),
    tokenised as training tokenises a response. The prompt runs once; its cached keys and values serve every
    answer."""
    device = devices.of(model)
    prompt_ids = tokenizer(format_prompt(prompt, tokenizer), add_special_tokens=False, return_tensors="pt")
    prompt_ids = prompt_ids["input_ids"].to(device)
    answer_ids = [tokenizer(a + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"] for a in answers]
    width = max(len(ids) for ids in answer_ids)
    ids = torch.tensor([a + [tokenizer.pad_token_id] * (width - len(a)) for a in answer_ids], device=device)
    real = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a in answer_ids], device=device)
    prompted = model(input_ids=prompt_ids, use_cache=True)
    cache = prompted.past_key_values
    cache.batch_repeat_interleave(len(answers))
    attention = torch.cat([real.new_ones(len(answers), prompt_ids.shape[1]), real], dim=1)
    logits = model(input_ids=ids, attention_mask=attention, past_key_values=cache).logits.float()
    first = prompted.logits[0, -1].float().log_softmax(-1)[ids[:, 0]]  # the prompt's last token predicts it
    following = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return first + (following * real[:, 1:]).sum(dim=1)


@torch.no_grad()
def generate(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, text: str, task: Task, max_new_tokens: int
) -> str:
    """The model's greedy continuation of ``text``, without ``text``: for ``causal_lm`` its answer to ``text`` as
    a prompt (chat-formatted as in training), for ``plain_text`` what follows ``text`` as the start of a document."""
    inputs = tokenizer(
        format_prompt(text, tokenizer) if task == "causal_lm" else text,
        add_special_tokens=False,
        return_token_type_ids=False,
        return_tensors="pt",
    ).to(devices.of(model))
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
