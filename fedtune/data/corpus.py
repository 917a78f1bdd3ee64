"""The one type every data loader returns."""

from __future__ import annotations

from dataclasses import dataclass

import datasets

from fedtune.tasks import Task


@dataclass(frozen=True)
class Corpus:
    """A text dataset ready to be split into clients.

    Attributes:
        dataset: Rows of ``text`` (str) and ``label`` (int) for classification, ``prompt`` and
            ``response`` (str) for causal LM instruction tuning, or ``text`` (str, one document per row) for
            plain text. Extra columns (for example an organisation id used by natural partitioning) are kept.
        task: Which of the three layouts ``dataset`` has (fedtune/tasks.py).
        label_names: Name of each class id (classification); for a causal LM corpus whose every response is one
            of a closed set of answers (``icd10_instructions``: the chapter names), that set, which evaluation
            ranks by likelihood (``answer_accuracy``).
        description: One paragraph for the model card: source, licence, attribution.
    """

    dataset: datasets.Dataset
    task: Task
    label_names: tuple[str, ...] | None = None
    description: str = ""
