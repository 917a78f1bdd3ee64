"""``fedtune predict RUN_DIR "text" ...``: a run's final adapter on texts from the command line.

A classifier gives each text's most probable class and its probability (softmax over the run's classes); a
causal LM its greedy answer to each text as a prompt (chat-formatted as in training) and, where its task has
a closed set of answers, the one of the set it finds likeliest, with its probability within the set (greedy
decoding can leave that answer at a shared first word: fedtune/evaluation.py, ``answer_accuracy``); a
plain-text LM its greedy continuation of each text as the start of a document. The inputs are truncated and
encoded as in training and evaluation (fedtune/training.py, fedtune/evaluation.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedtune import devices
from fedtune.evaluation import answer_log_likelihoods, generate
from fedtune.finished_run import FinishedRun
from fedtune.training import encode


@dataclass(frozen=True)
class Prediction:
    """What the final adapter makes of one text.

    Attributes:
        text: The input.
        answer: A classifier's class name, a causal LM's generated answer, or a plain-text LM's continuation.
        probability: A classifier's probability of that class (None for a causal LM).
        likeliest: A causal LM with a closed set of answers: the set's likeliest answer and its probability
            among the set's answers.
    """

    text: str
    answer: str
    probability: float | None = None
    likeliest: tuple[str, float] | None = None

    def lines(self) -> str:
        """The text, then ``  -> <answer>`` (with a classifier's probability in brackets), then a causal LM's
        likeliest answer of its set, if it has one."""
        probability = f" ({self.probability:.4f})" if self.probability is not None else ""
        likeliest = (
            f"\n  likeliest of its answers: {self.likeliest[0]} ({self.likeliest[1]:.4f})" if self.likeliest else ""
        )
        return f"{self.text}\n  -> {self.answer}{probability}{likeliest}"


@torch.no_grad()
def predict(run: FinishedRun, texts: Sequence[str], max_new_tokens: int = 64) -> list[Prediction]:
    """The final adapter's prediction for each of ``texts`` (a causal LM generates at most ``max_new_tokens``)."""
    model, tokenizer, experiment = run.model(), run.experiment.tokenizer, run.experiment
    device, names, task = devices.of(model), run.label_names, experiment.model_spec.task
    with devices.autocast(device, experiment.train_config.precision):
        if names is None:
            answers = _closed_answers(run) if task == "causal_lm" else None
            return [
                Prediction(
                    text,
                    generate(model, tokenizer, text, task, max_new_tokens).strip(),
                    likeliest=_likeliest(model, tokenizer, text, answers) if answers else None,
                )
                for text in texts
            ]
        rows = {"text": list(texts), "label": [0] * len(texts)}  # encode() takes labelled rows; these go unused
        batch = encode(rows, "classification", tokenizer, experiment.model_spec.max_length, device)
        batch.pop("labels")
        probabilities = model(**batch).logits.float().softmax(dim=-1)
    best, classes = probabilities.max(dim=-1)
    return [
        Prediction(text, names[index], float(probability))
        for text, index, probability in zip(texts, classes.tolist(), best.tolist(), strict=True)
    ]


def _likeliest(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, answers: Sequence[str]
) -> tuple[str, float]:
    """Of ``answers``, the one the model finds likeliest after ``prompt``, and its probability among them."""
    probabilities = answer_log_likelihoods(model, tokenizer, prompt, answers).softmax(dim=0)
    best = int(probabilities.argmax())
    return answers[best], float(probabilities[best])


def _closed_answers(run: FinishedRun) -> tuple[str, ...] | None:
    """A causal LM run's closed set of answers: from its config or its data, where this machine has them."""
    try:
        return run.experiment.label_names
    except (OSError, ValueError):  # the run's own file lies on another machine: the greedy answer alone
        return None
