"""What the `data` config group describes: a corpus loader and how to split it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DataSpec:
    """Where the data comes from and how much of it is held out.

    Args:
        loader: Config node (``_target_`` + arguments) of a function returning a
            :class:`fedtune.data.Corpus`. It is called on each client, not at start-up.
        test_size: Rows of the central held-out test set, or a fraction of the corpus if below 1.
        val_fraction: Fraction of each client's partition kept for federated validation.

    Raises:
        ValueError: If a size is out of range.
    """

    loader: Any
    test_size: int | float = 0.1
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not self.test_size > 0:
            raise ValueError(f"data.test_size={self.test_size}: must be a row count >= 1 or a fraction in (0, 1).")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction={self.val_fraction}: must be in (0, 1), e.g. 0.1.")
