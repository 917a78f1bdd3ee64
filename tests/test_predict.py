"""``fedtune predict RUN_DIR "text" ...`` through the command line: exit code and printed lines, against an
independent computation on the run's PEFT model with its final adapter (a softmax over the run's classes;
a greedy decoding loop written out here, not ``generate``, from a prompt or, for plain text, the text itself;
a causal LM's likeliest answer of its set from one uncached pass per answer)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune import cli
from fedtune.finished_run import load_run
from fedtune.training import IGNORE_INDEX, encode, format_prompt

TEXTS = ["Tuberculosis of lung", "Displaced fracture of shaft of left femur"]


def _predict(run: Path, capsys: pytest.CaptureFixture[str], *arguments: str) -> list[str]:
    """The lines ``fedtune predict`` prints to stdout, without the log lines."""
    assert cli.main(["predict", str(run), *arguments]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if " fedtune: " not in line]


def test_a_classifier_prints_each_text_s_class_and_probability(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    finished = load_run(tiny_run)
    batch = finished.experiment.tokenizer(TEXTS, return_tensors="pt", padding=True, truncation=True, max_length=32)
    with torch.no_grad():
        probabilities = torch.softmax(finished.model()(**batch).logits, dim=-1)
    expected = []
    for text, row in zip(TEXTS, probabilities, strict=True):
        best = int(row.argmax())
        expected += [text, f"  -> {finished.label_names[best]} ({float(row[best]):.4f})"]
    assert _predict(tiny_run, capsys, *TEXTS) == expected


def _greedy(run: Path, source: str, steps: int) -> str:
    """The run's final model's greedy continuation of ``source`` (the exact input text), decoded and trimmed."""
    finished = load_run(run)
    model, tokenizer = finished.model(), finished.experiment.tokenizer
    ids = tokenizer(source, add_special_tokens=False, return_tensors="pt")["input_ids"]
    sequence = ids
    with torch.no_grad():
        for _ in range(steps):
            token = model(input_ids=sequence).logits[0, -1].argmax()
            if int(token) == tokenizer.eos_token_id:
                break
            sequence = torch.cat([sequence, token.view(1, 1)], dim=1)
    answer = sequence[0, ids.shape[1] :]
    return tokenizer.decode(answer, skip_special_tokens=True).strip()


def _likeliest(run: Path, prompt: str) -> tuple[str, float]:
    """Of the run's answers (the ICD-10 chapters), the likeliest after ``prompt`` and its probability among them:
    one uncached pass per answer, scored as training scores a response (end-of-sequence token included)."""
    finished = load_run(run)
    model, tokenizer, names = finished.model(), finished.experiment.tokenizer, finished.experiment.label_names
    scores = []
    for name in names:
        batch = encode({"prompt": [prompt], "response": [name]}, "causal_lm", tokenizer, 1024)
        labels = batch.pop("labels")[0, 1:]
        with torch.no_grad():
            log_probabilities = model(**batch).logits[0, :-1].log_softmax(dim=-1)
        kept = labels != IGNORE_INDEX
        scores.append(float(log_probabilities[kept].gather(-1, labels[kept][:, None]).sum()))
    probabilities = torch.tensor(scores).softmax(dim=0)
    best = int(probabilities.argmax())
    return names[best], float(probabilities[best])


def test_a_causal_lm_prints_its_greedy_answer_and_the_likeliest_of_its_answers(
    tiny_causal_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = _greedy(tiny_causal_run, format_prompt(TEXTS[0], load_run(tiny_causal_run).experiment.tokenizer), 6)
    assert expected  # an answer to compare, not two empty strings
    text, greedy, likeliest = _predict(tiny_causal_run, capsys, TEXTS[0], "--max-new-tokens", "6")
    assert [text, greedy] == [TEXTS[0], f"  -> {expected}"]
    name, probability = _likeliest(tiny_causal_run, TEXTS[0])
    assert likeliest.startswith(f"  likeliest of its answers: {name} (")
    assert float(likeliest.rsplit("(", 1)[1].rstrip(")")) == pytest.approx(probability, abs=1e-4)


def test_a_plain_text_lm_prints_its_greedy_continuation_of_the_text_itself(
    tiny_plain_text_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No chat template: the text is the start of a document, as in training."""
    text = "Abnormality of the"
    expected = _greedy(tiny_plain_text_run, text, 6)
    assert expected
    assert _predict(tiny_plain_text_run, capsys, text, "--max-new-tokens", "6") == [text, f"  -> {expected}"]
