"""Who contributed what (config group ``contribution``): data, compute and utility per organisation and round.

Off by default (``contribution=none``). With ``contribution=shapley`` the server credits, each round, every
organisation whose update it applied with
- **data**: the examples it trained on, from a report the node signs (exact in the clear; a bucket checked
  against the masked total weight under ``secure=masking``; one unit per round under organisation-level DP,
  where the counts are not used);
- **compute**: its local steps x batch size, from the same signed report (wall time is not reproducible);
- **utility**: its Shapley value in the round's improvement of the loss on a validation split of the
  server's own (fedtune/contribution/valuation.py), exact over 2^n coalitions up to ``exact_up_to`` players
  and by GTG-Shapley's seeded sampling above (fedtune/contribution/shapley.py). Under ``secure=masking`` the
  players are fixed groups of organisations (fedtune/contribution/groups.py): the server learns one sum per
  group, never a smaller one, and a group's members share its value.
Over the run each kind k is summed into C_k,i and turned into shares c_k,i = max(C_k,i, 0) / sum_j max(C_k,j, 0);
the contribution value is V_i = sum_k W_k c_k,i with the consortium's weights W (``contribution.weights``, in
the config and so in the ledger's config hash). Every round's entry in the ledger holds the coalition
utilities, the values and the signed reports; ``fedtune audit`` recomputes all of it
(fedtune/contribution/audit.py), and ``fedtune contributions RUN_DIR`` shows the leaderboard.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedtune.contribution.shapley import Sampling

KINDS = ("data", "compute", "utility")


@dataclass(frozen=True)
class NoContribution:
    """No contribution accounting (``contribution=none``): nothing is measured, reported or recorded."""

    enabled = False

    def check(self, masked: bool, **_: object) -> None:
        """Nothing to refuse."""

    def describe(self) -> str:
        """One line for the model card."""
        return "none"


@dataclass(frozen=True)
class ShapleyContribution:
    """Data, compute and Shapley utility per organisation (``contribution=shapley``).

    Args:
        weights: W_k of each kind (``data``, ``compute``, ``utility``), non-negative, adding up to 1: the
            consortium's own rule for how much each kind counts in the contribution value V.
        exact_up_to: Exact Shapley values (2^n coalition evaluations a round) for up to this many players;
            GTG-Shapley sampling for more.
        validation_rows: Rows of the server's held-out data set aside to value coalitions (taken from the
            central test set, which keeps the rest, so utility is never measured on the rows that report
            the model's quality).
        group_size: Under ``secure=masking``: the fewest organisations in one fixed group (at least 3, as a
            node's smallest masked round). The server learns each group's sum, so a smaller group would
            tell it more about each member's update.
        data_bucket: Under ``secure=masking``: nodes report their example count rounded down to a multiple of
            this (the exact count stays masked; the server checks the buckets against each group's total).
        truncation: GTG-Shapley's within-permutation truncation (fedtune/contribution/shapley.py).
        tolerance: GTG-Shapley's convergence tolerance.
        max_permutations: GTG-Shapley's most permutations a round.

    Raises:
        ValueError: An unknown kind, weights that are negative or do not add up to 1, or an out-of-range value.
    """

    weights: Mapping[str, float] = field(default_factory=lambda: {"data": 0.25, "compute": 0.25, "utility": 0.5})
    exact_up_to: int = 6
    validation_rows: int = 100
    group_size: int = 3
    data_bucket: int = 100
    truncation: float = 0.01
    tolerance: float = 0.02
    max_permutations: int = 50

    enabled = True

    def __post_init__(self) -> None:
        weights = {str(k): float(v) for k, v in dict(self.weights).items()}
        unknown = sorted(set(weights) - set(KINDS))
        if unknown:
            raise ValueError(f"contribution.weights has unknown kind(s) {unknown}; the kinds are {list(KINDS)}.")
        if any(not w >= 0 for w in weights.values()) or not math.isclose(sum(weights.values()), 1.0, abs_tol=1e-9):
            raise ValueError(
                f"contribution.weights={weights}: non-negative weights adding up to 1, e.g. "
                "{data: 0.25, compute: 0.25, utility: 0.5}."
            )
        object.__setattr__(self, "weights", {kind: weights.get(kind, 0.0) for kind in KINDS})
        if not 1 <= self.exact_up_to <= 12:
            raise ValueError(
                f"contribution.exact_up_to={self.exact_up_to}: between 1 and 12 (2^n evaluations a round)."
            )
        if self.validation_rows < 1:
            raise ValueError(f"contribution.validation_rows={self.validation_rows}: at least 1.")
        if self.data_bucket < 1:
            raise ValueError(f"contribution.data_bucket={self.data_bucket}: at least 1 (1 reports exact counts).")
        self.sampling  # noqa: B018 - checks the GTG settings

    @property
    def sampling(self) -> Sampling:
        """GTG-Shapley's settings."""
        return Sampling(self.truncation, self.tolerance, self.max_permutations)

    def check(
        self,
        masked: bool,
        num_clients: int,
        fraction_train: float,
        ring: bool,
        noise_at_clients: bool,
        min_round_clients: int,
    ) -> None:
        """Refuse what would reveal more than the config promises, or could not be measured.

        Args:
            masked: ``secure=masking``.
            num_clients: ``federation.num_clients``.
            fraction_train: ``federation.fraction_train``.
            ring: SecAgg+ neighbourhoods are configured (``secure.neighbours``).
            noise_at_clients: Organisation-level DP with the noise added by the clients.
            min_round_clients: The smallest masked round a node takes part in.

        Raises:
            ValueError: Naming the setting and the fix.
        """
        if not masked:
            return
        if self.group_size < min_round_clients:
            raise ValueError(
                f"contribution.group_size={self.group_size}: under secure=masking the server learns each group's "
                f"sum, and a node takes part in no masked sum of fewer than {min_round_clients} updates; set it "
                f"to at least {min_round_clients}."
            )
        if num_clients // self.group_size < 2:
            raise ValueError(
                f"contribution=shapley under secure=masking values fixed groups of at least "
                f"contribution.group_size={self.group_size}, and federation.num_clients={num_clients} makes only "
                "one: the server learns the total alone and cannot tell anyone's utility apart. Add clients, "
                "lower contribution.group_size (not below 3), or use secure=none."
            )
        if fraction_train != 1:
            raise ValueError(
                "contribution=shapley under secure=masking masks within fixed groups, which need all their members "
                f"in every round; federation.fraction_train={fraction_train} samples. Set federation.fraction_train=1."
            )
        if ring:
            raise ValueError(
                "contribution=shapley under secure=masking masks within each fixed group (every member with every "
                "other), which secure.neighbours (a SecAgg+ ring across the round) contradicts; set "
                "secure.neighbours=null."
            )
        if noise_at_clients:
            raise ValueError(
                "contribution=shapley under secure=masking reveals one sum per group, but with organisation-level "
                "DP and noise added by the clients each client's noise is sized for the whole round's sum, so a "
                "group's sum would carry only part of it. Use privacy.noise_at=server, or contribution=none."
            )

    def describe(self) -> str:
        """One line for the model card."""
        weights = ", ".join(f"{k} {w:g}" for k, w in self.weights.items())
        return f"Shapley utility on {self.validation_rows} server-held validation rows, weights: {weights}"
