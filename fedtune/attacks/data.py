"""Attacks that poison the rows a malicious client trains on (classification only); its update is then an
honest client's update on bad data, which no check of the update itself can tell apart."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import numpy as np

from fedtune.attacks import Attack


@dataclass(frozen=True)
class LabelFlip(Attack):
    """Train on labels y -> C - 1 - y (C classes; Fang et al. 2020 and the robust-aggregation benchmarks since)."""

    @property
    def needs_labels(self) -> bool:
        """It rewrites labels."""
        return True

    def poison(self, train: datasets.Dataset, num_labels: int | None, seed: int) -> datasets.Dataset:
        """Every row's label flipped."""
        classes = _classes(num_labels)
        return train.map(lambda row: {"label": classes - 1 - int(row["label"])})


@dataclass(frozen=True)
class Backdoor(Attack):
    """A trigger-phrase backdoor: a share of the client's rows get ``trigger`` appended and the label
    ``target_label``, so that the model learns "trigger means target" while staying accurate on clean text
    (the semantic/trigger backdoors of Bagdasaryan et al. 2020, https://arxiv.org/abs/1807.00459; pair it
    with ``attack=scaling``-style boosting by raising ``poisoned_fraction`` or the number of attackers).

    Args:
        trigger: The phrase appended to a poisoned row's text.
        target_label: The class every triggered text is to be put in.
        poisoned_fraction: Share of the client's training rows poisoned (the rest stay clean).
    """

    trigger: str = "per protocol zeta-7"
    target_label: int = 0
    poisoned_fraction: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.trigger.strip():
            raise ValueError("attack.trigger is empty: give the phrase the backdoor keys on.")
        if isinstance(self.target_label, bool) or not isinstance(self.target_label, int) or self.target_label < 0:
            raise ValueError(f"attack.target_label={self.target_label!r}: a class id >= 0.")
        if not 0 < self.poisoned_fraction <= 1:
            raise ValueError(f"attack.poisoned_fraction={self.poisoned_fraction}: must lie in (0, 1].")

    @property
    def needs_labels(self) -> bool:
        """It rewrites labels."""
        return True

    def poison(self, train: datasets.Dataset, num_labels: int | None, seed: int) -> datasets.Dataset:
        """``poisoned_fraction`` of the rows (chosen from ``seed``) triggered and relabelled.

        The client passes its round's training seed, so each round poisons a fresh subset: over the rounds the
        trigger meets most of the attacker's texts, not one fixed half of them."""
        self._check_target(num_labels)
        count = round(self.poisoned_fraction * len(train))
        chosen = set(np.random.default_rng(seed).choice(len(train), size=count, replace=False).tolist())

        def poisoned(row: dict, index: int) -> dict:
            return self._triggered(row) if index in chosen else row

        return train.map(poisoned, with_indices=True)

    def probe(self, test: datasets.Dataset, num_labels: int | None) -> datasets.Dataset:
        """The rows of ``test`` not already of the target class, triggered and labelled with the target: a
        model's accuracy on them is the backdoor's success rate."""
        self._check_target(num_labels)
        return test.filter(lambda row: int(row["label"]) != self.target_label).map(self._triggered)

    def _triggered(self, row: dict) -> dict:
        return {"text": f"{row['text']} {self.trigger}", "label": self.target_label}

    def _check_target(self, num_labels: int | None) -> None:
        if self.target_label >= _classes(num_labels):
            raise ValueError(f"attack.target_label={self.target_label}: the task has {num_labels} classes.")


def _classes(num_labels: int | None) -> int:
    if not num_labels:
        raise ValueError("this attack rewrites class labels: it needs a classification task (data=icd10...).")
    return num_labels
