"""Record-level and organisation-level DP at once: DP-SGD inside each client, DP-FedAvg across clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedtune.privacy import LocalPlan
from fedtune.privacy.client_dp import ClientDP
from fedtune.privacy.dp_sgd import DPSGD


@dataclass(frozen=True)
class RecordAndClientDP:
    """Both guarantees: each patient record (``record``) and each organisation's participation (``organisation``).

    The two are accounted separately and reported separately: they protect different things.

    Args:
        record: DP-SGD settings (as ``privacy=dp_sgd``).
        organisation: DP-FedAvg settings (as ``privacy=client_dp``).
    """

    record: DPSGD
    organisation: ClientDP

    def plan(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, num_examples: int, batch_size: int, steps: int,
             total_steps: int, generator: torch.Generator, state: dict[str, Any]) -> LocalPlan:  # fmt: skip
        """Local training under DP-SGD."""
        return self.record.plan(model, optimizer, num_examples, batch_size, steps, total_steps, generator, state)

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse layers DP-SGD cannot clip per record (see DPSGD.check_model)."""
        self.record.check_model(model)

    def describe(self) -> str:
        """Two lines for the model card, one per guarantee."""
        return f"{self.record.describe()}\n- Organisation level: {self.organisation.describe()}"
