"""``fedtune predict RUN_DIR "text" ...``: a run's final adapter on texts from the command line.

A classifier gives each text's most probable class and its probability (softmax over the run's classes); a
causal LM its greedy answer to each text as a prompt (chat-formatted as in training); a plain-text LM its
greedy continuation of each text as the start of a document. The inputs are truncated and encoded as in
training and evaluation (fedtune/training.py, fedtune/evaluation.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedtune import devices
from fedtune.evaluation import generate
from fedtune.finished_run import FinishedRun
from fedtune.training import encode


@dataclass(frozen=True)
class Prediction:
    """What the final adapter makes of one text.

    Attributes:
        text: The input.
        answer: A classifier's class name, a causal LM's generated answer, or a plain-text LM's continuation.
        probability: A classifier's probability of that class (None for a causal LM).
    """

    text: str
    answer: str
    probability: float | None = None

    def lines(self) -> str:
        """The text, then ``  -> <answer>`` (with a classifier's probability in brackets)."""
        probability = f" ({self.probability:.4f})" if self.probability is not None else ""
        return f"{self.text}\n  -> {self.answer}{probability}"


@torch.no_grad()
def predict(run: FinishedRun, texts: Sequence[str], max_new_tokens: int = 64) -> list[Prediction]:
    """The final adapter's prediction for each of ``texts`` (a causal LM generates at most ``max_new_tokens``)."""
    model, tokenizer, experiment = run.model(), run.experiment.tokenizer, run.experiment
    device, names, task = devices.of(model), run.label_names, experiment.model_spec.task
    with devices.autocast(device, experiment.train_config.precision):
        if names is None:
            return [Prediction(text, generate(model, tokenizer, text, task, max_new_tokens).strip()) for text in texts]
        rows = {"text": list(texts), "label": [0] * len(texts)}  # encode() takes labelled rows; these go unused
        batch = encode(rows, "classification", tokenizer, experiment.model_spec.max_length, device)
        batch.pop("labels")
        probabilities = model(**batch).logits.float().softmax(dim=-1)
    best, classes = probabilities.max(dim=-1)
    return [
        Prediction(text, names[index], float(probability))
        for text, index, probability in zip(texts, classes.tolist(), best.tolist(), strict=True)
    ]
