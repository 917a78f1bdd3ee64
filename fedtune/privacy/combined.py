"""Record-level and organisation-level DP at once: DP-SGD inside each client, DP-FedAvg across clients."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedtune.aggregation import Weighting
from fedtune.privacy import LocalPlan, PlanRequest
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

    @property
    def weighting(self) -> Weighting:
        """The organisation-level guarantee's (see ClientDP.weighting)."""
        return self.organisation.weighting

    def plan(self, request: PlanRequest) -> LocalPlan:
        """Local training under DP-SGD."""
        return self.record.plan(request)

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse layers DP-SGD cannot clip per record (see DPSGD.check_model)."""
        self.record.check_model(model)

    def describe(self) -> str:
        """Two lines for the model card, one per guarantee."""
        return f"{self.record.describe()}\n- Organisation level: {self.organisation.describe()}"
