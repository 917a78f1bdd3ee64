"""Tokenisation, batching, the local loop and the evaluation metrics."""

from __future__ import annotations

import io
import logging
import math
import sys
from pathlib import Path

import datasets
import pytest
import torch
from peft import LoraConfig
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fedtune import adapters, client, config, training
from fedtune.evaluation import (
    TOKENS,
    answer_accuracy,
    answer_log_likelihoods,
    evaluate,
    federated_metrics,
    macro_f1,
    majority_baseline,
)
from fedtune.experiment import get_experiment
from fedtune.models import ModelSpec, build_model, load_tokenizer
from fedtune.privacy import shuffled_batches
from fedtune.training import IGNORE_INDEX, TrainConfig, encode, local_train, sequence_loss, truncated_documents
from tests.conftest import tiny_overrides

QA = datasets.Dataset.from_dict(
    {"prompt": ["capital of France?", "two plus two?"] * 8, "response": ["paris", "four"] * 8}
)
TEXTS = datasets.Dataset.from_dict(
    {"text": ["fever and cough", "broken arm", "chest pain", "skin rash"] * 8, "label": [0, 1, 2, 3] * 8}
)
DOCUMENTS = datasets.Dataset.from_dict(
    {
        "text": [
            "fever and cough for three days",
            "a displaced fracture of the left femur after a fall from a ladder, treated with a nail",
            "rash",
            "chest pain on exertion, relieved by rest",
        ]
        * 8
    }
)


def test_causal_encoding_learns_only_the_answer(tiny_llama_dir: Path) -> None:
    tokenizer = load_tokenizer(ModelSpec(str(tiny_llama_dir), "causal_lm", 64))
    batch = encode(QA[:2], "causal_lm", tokenizer, 64)
    answer = tokenizer("paris" + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    labels = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX].tolist()
    assert labels == answer  # prompt and padding masked out
    assert batch["attention_mask"][0].sum() == (batch["input_ids"][0] != tokenizer.pad_token_id).sum()


def test_plain_text_labels_are_the_input_ids_except_padding(tiny_llama_dir: Path) -> None:
    """Every token of a document is learned, its end too; a long document is cut to max_length, and counted."""
    tokenizer = load_tokenizer(ModelSpec(str(tiny_llama_dir), "plain_text", 16))
    rows = DOCUMENTS[:3]
    batch = encode(rows, "plain_text", tokenizer, 16)
    for row, text in enumerate(rows["text"]):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        kept = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][kept].tolist() == expected[:16]  # no chat template, no special tokens first
        assert torch.equal(batch["labels"][row][kept], batch["input_ids"][row][kept])
        assert (batch["labels"][row][~kept] == IGNORE_INDEX).all()  # padding, though pad and eos are one token here
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in rows["text"]]
    assert lengths[1] > 16 and batch["input_ids"].shape[1] == 16 and not batch["attention_mask"][2].all()
    assert truncated_documents(rows["text"], tokenizer, 16) == sum(length > 16 for length in lengths) == 1


def test_plain_text_perplexity_is_exp_of_the_mean_loss_over_every_predicted_token(tiny_llama_dir: Path) -> None:
    """Against each document run alone (no padding) through the model, the log-probabilities summed by hand:
    the loss is the mean over all predicted tokens of the split (not a mean of the documents' means); a
    document has no exact match to check."""
    spec = ModelSpec(str(tiny_llama_dir), "plain_text", 16)
    model, initial = build_model(spec, LoraConfig(r=4, lora_alpha=8), None, seed=0)
    adapters.set_adapter(model, initial)
    tokenizer = load_tokenizer(spec)
    rows = DOCUMENTS.select(range(4))
    metrics = evaluate(model, rows, "plain_text", tokenizer, 16, TrainConfig(eval_batch_size=3, generation_examples=2))
    total, tokens = 0.0, 0
    with torch.no_grad():
        for text in rows["text"]:
            ids = (tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:16]
            log_probs = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(dim=-1)
            total -= sum(float(log_probs[t - 1, ids[t]]) for t in range(1, len(ids)))
            tokens += len(ids) - 1
    assert set(metrics) == {"loss", "perplexity"}
    assert math.isclose(metrics["loss"], total / tokens, rel_tol=1e-5)
    assert math.isclose(metrics["perplexity"], math.exp(total / tokens), rel_tol=1e-5)


def test_federated_loss_weighs_each_client_by_its_evaluated_tokens() -> None:
    """A client with 30 tokens at loss 2 and one with 10 at loss 4: the loss over all 40 tokens is 2.5, whatever
    the clients' row counts; without counts (secure aggregation) they count equally. Classifiers: untouched."""
    results = [
        {"loss": 2.0, "perplexity": math.exp(2.0), "num_examples": 5.0, TOKENS: 30.0},
        {"loss": 4.0, "perplexity": math.exp(4.0), "num_examples": 5.0, TOKENS: 10.0},
    ]
    by_examples = {"loss": 3.0, "perplexity": (math.exp(2.0) + math.exp(4.0)) / 2}
    assert federated_metrics(results, by_examples) == pytest.approx({"loss": 2.5, "perplexity": math.exp(2.5)})
    withheld = [{"loss": r["loss"], "perplexity": r["perplexity"]} for r in results]
    assert federated_metrics(withheld, by_examples) == pytest.approx({"loss": 3.0, "perplexity": math.exp(3.0)})
    classifier = {"loss": 1.0, "accuracy": 0.5}
    assert federated_metrics([classifier], classifier) == classifier


def test_batches_are_reproducible_and_cover_every_row() -> None:
    first = list(shuffled_batches(len(TEXTS), 8, 4, torch.Generator().manual_seed(1)))
    again = list(shuffled_batches(len(TEXTS), 8, 4, torch.Generator().manual_seed(1)))
    other = list(shuffled_batches(len(TEXTS), 8, 4, torch.Generator().manual_seed(2)))
    assert first == again and first != other
    assert sorted(sum(first, [])) == list(range(32))  # 4 batches of 8 = one epoch of 32 rows


def test_sequence_loss_matches_a_per_example_reference() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 6, 0]])
    expected = []
    for row in range(2):
        terms = [
            torch.nn.functional.cross_entropy(logits[row, t - 1], labels[row, t])
            for t in range(1, 5)
            if labels[row, t] != IGNORE_INDEX
        ]
        expected.append(torch.stack(terms).mean())
    assert torch.allclose(sequence_loss(logits, labels, "causal_lm"), torch.stack(expected))


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_local_training_lowers_the_loss_and_only_moves_the_adapter(
    task: str, tiny_bert_dir: Path, tiny_llama_dir: Path
) -> None:
    path, data = (tiny_bert_dir, TEXTS) if task == "classification" else (tiny_llama_dir, QA)
    spec = ModelSpec(str(path), task, 32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    model, initial = build_model(spec, lora, num_labels=4 if task == "classification" else None, seed=0)
    adapters.set_adapter(model, initial)  # the model is cached per process: start from the initial adapter
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    config = TrainConfig(local_steps=60, batch_size=8, lr=0.01, eval_batch_size=16)
    before = evaluate(model, data, task, load_tokenizer(spec), 32, config)["loss"]
    local_train(model, data, task, load_tokenizer(spec), 32, config, torch.Generator().manual_seed(0))
    after = evaluate(model, data, task, load_tokenizer(spec), 32, config)["loss"]
    assert after < before - 0.25  # a clear drop; untouched weights would leave the loss where it was
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_macro_f1_matches_a_hand_computation() -> None:
    # class 0: tp=1 fp=1 fn=1 -> F1 1/2; class 1: tp=1 fp=0 fn=1 -> 2/3; class 2: tp=1 fp=1 fn=0 -> 2/3
    assert math.isclose(macro_f1([0, 0, 1, 1, 2], [0, 2, 1, 0, 2]), (1 / 2 + 2 / 3 + 2 / 3) / 3)


def test_majority_baseline_predicts_the_most_frequent_training_label() -> None:
    result = majority_baseline([1, 1, 1, 0], [1, 0, 1, 2])
    assert result["accuracy"] == 0.5
    assert math.isclose(result["macro_f1"], (2 / 3) / 3)  # F1 of class 1 is 2/3; classes 0 and 2 score 0


def test_causal_lm_metrics_are_consistent(tiny_llama_dir: Path) -> None:
    spec = ModelSpec(str(tiny_llama_dir), "causal_lm", 32)
    model, initial = build_model(spec, LoraConfig(r=4, lora_alpha=8), None, seed=0)
    adapters.set_adapter(model, initial)
    metrics = evaluate(model, QA, "causal_lm", load_tokenizer(spec), 32, TrainConfig(generation_examples=2))
    assert math.isclose(metrics["perplexity"], math.exp(metrics["loss"]), rel_tol=1e-9)
    assert 0.0 <= metrics["exact_match"] <= 1.0
    assert "answer_accuracy" not in metrics  # no closed set of answers given


ANSWERS = ("paris", "four", "the capital of france is paris")  # of 1 to 7 tokens


def _trained_llama(tiny_llama_dir: Path) -> tuple[torch.nn.Module, object]:
    """The tiny Llama with a random non-zero adapter, so that LoRA's path counts in the likelihoods too."""
    spec = ModelSpec(str(tiny_llama_dir), "causal_lm", 64)
    model, initial = build_model(spec, LoraConfig(r=4, lora_alpha=8), None, seed=0)
    generator = torch.Generator().manual_seed(1)
    adapters.set_adapter(model, {name: torch.randn(v.shape, generator=generator) * 0.1 for name, v in initial.items()})
    return model.eval(), load_tokenizer(spec)


def _uncached_log_likelihood(model: torch.nn.Module, tokenizer: object, prompt: str, answer: str) -> float:
    """The reference: prompt and answer in one pass, as training encodes and scores them (no cache, no padding)."""
    batch = encode({"prompt": [prompt], "response": [answer]}, "causal_lm", tokenizer, 64)
    labels = batch.pop("labels")
    with torch.no_grad():
        mean = sequence_loss(model(**batch).logits, labels, "causal_lm")
    return -float(mean * (labels[:, 1:] != IGNORE_INDEX).sum())


def test_answer_log_likelihoods_equal_one_uncached_pass_per_answer(tiny_llama_dir: Path) -> None:
    """The shared prompt cache and the padding of shorter answers change nothing: each answer's score is its
    training log-likelihood (first token predicted by the prompt, end-of-sequence token included)."""
    model, tokenizer = _trained_llama(tiny_llama_dir)
    scores = answer_log_likelihoods(model, tokenizer, "capital of France?", ANSWERS)
    expected = [_uncached_log_likelihood(model, tokenizer, "capital of France?", answer) for answer in ANSWERS]
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-4)
    assert len(set(expected)) == len(ANSWERS)  # distinct: the comparison could tell answers apart


def test_answer_accuracy_counts_the_rows_whose_reference_is_the_most_likely_answer(tiny_llama_dir: Path) -> None:
    model, tokenizer = _trained_llama(tiny_llama_dir)
    prompts = ["capital of France?", "two plus two?", "where is the Louvre?"]
    rows = datasets.Dataset.from_dict(
        {"prompt": [p for p in prompts for _ in ANSWERS], "response": [a for _ in prompts for a in ANSWERS]}
    )
    likeliest = {p: max(ANSWERS, key=lambda a: _uncached_log_likelihood(model, tokenizer, p, a)) for p in prompts}
    expected = sum(row["response"] == likeliest[row["prompt"]] for row in rows) / len(rows)
    assert answer_accuracy(model, rows, tokenizer, ANSWERS) == pytest.approx(expected) == 1 / 3
    config = TrainConfig(generation_examples=len(rows))
    assert evaluate(model, rows, "causal_lm", tokenizer, 64, config, ANSWERS)["answer_accuracy"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("privacy", ["privacy=none", "privacy=dp_sgd"])
def test_a_cosine_schedule_spans_the_whole_run_round_after_round(
    tiny_bert_dir: Path, tmp_path: Path, privacy: str
) -> None:
    """Each round continues the schedule where the last ended (the position comes from the round, so a
    resumed round takes the same rates), under DP-SGD's wrapped optimizer too."""
    overrides = tiny_overrides(tiny_bert_dir, tmp_path, "train.lr_schedule=cosine", "train.lr=0.01", privacy)
    experiment = get_experiment(config.compose(overrides))
    rates: list[float] = []
    hook = register_optimizer_step_pre_hook(lambda optimizer, *_: rates.append(optimizer.param_groups[0]["lr"]))
    try:
        adapter, state = experiment.initial_adapter(), {}
        for server_round in (1, 2):
            update, _ = client.train_round(experiment, experiment.client_data(0), adapter, server_round, "c", state)
            adapter = adapters.apply(adapter, update)
    finally:
        hook.remove()
    total = 2 * 3  # rounds x local steps
    assert rates == pytest.approx([0.01 * (1 + math.cos(math.pi * t / total)) / 2 for t in range(total)])


def test_a_batch_in_physical_batches_trains_as_the_whole_batch(tiny_bert_dir: Path) -> None:
    """Without DP, passes of 3 records (batches of 8: passes of 3, 3 and 2) accumulate each pass's mean
    weighted by its share, so the steps equal the whole batch's."""
    spec = ModelSpec(str(tiny_bert_dir), "classification", 32)
    model, initial = build_model(spec, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False), num_labels=4, seed=0)
    trained = []
    for physical in (0, 3):
        adapters.set_adapter(model, initial)
        config = TrainConfig(local_steps=3, batch_size=8, lr=0.01, physical_batch_size=physical)
        metrics = local_train(
            model, TEXTS, "classification", load_tokenizer(spec), 32, config, torch.Generator().manual_seed(0)
        )
        trained.append((adapters.get_adapter(model), metrics["train_loss"]))
    (whole, whole_loss), (split, split_loss) = trained
    assert math.isclose(split_loss, whole_loss, rel_tol=1e-5)
    assert adapters.fingerprint(whole) != adapters.fingerprint(initial)
    for name, tensor in whole.items():
        assert torch.allclose(split[name], tensor, atol=1e-6, rtol=1e-4), name


def _progress_lines_of_three_steps(tiny_bert_dir: Path, caplog: pytest.LogCaptureFixture) -> list[str]:
    """Train a tiny classifier 3 local steps with progress logged every step; the progress log lines."""
    spec = ModelSpec(str(tiny_bert_dir), "classification", 32)
    model, initial = build_model(spec, LoraConfig(r=4, lora_alpha=8), num_labels=4, seed=0)
    adapters.set_adapter(model, initial)
    config_ = TrainConfig(local_steps=3, batch_size=8, lr=0.01)
    with caplog.at_level(logging.INFO, logger="fedtune"):
        local_train(model, TEXTS, "classification", load_tokenizer(spec), 32, config_, torch.Generator().manual_seed(0))
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("local step")]


def test_a_long_local_round_logs_its_progress(
    tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A node's operator sees a minutes-long round advance (here every step: the interval is set to zero)."""
    monkeypatch.setattr(training, "PROGRESS_LOG_SECONDS", 0.0)
    lines = _progress_lines_of_three_steps(tiny_bert_dir, caplog)
    assert [line.split(",")[0] for line in lines] == ["local step 1/3", "local step 2/3", "local step 3/3"]
    assert all("last loss" in line and "s left" in line for line in lines)


class _Terminal(io.StringIO):
    """What an operator's interactive terminal looks like to the training loop."""

    def isatty(self) -> bool:
        return True


def test_a_round_in_an_interactive_terminal_shows_a_progress_bar_instead_of_log_lines(
    tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(training, "PROGRESS_LOG_SECONDS", 0.0)  # would log every step without a terminal
    assert not _progress_lines_of_three_steps(tiny_bert_dir, caplog)
    bar = terminal.getvalue()[terminal.getvalue().index("local steps") :]  # after the model's own loading bar
    assert "/3 [" in bar and "loss=" in bar
