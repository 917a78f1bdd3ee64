"""The robust aggregation rules (strategies/median.py ... norm_bounding.py): each against a hand computation,
each tolerating as many bad updates as its theory says on a constructed round, and each refused where the
server cannot see every update. :data:`HAND_COMPUTED` joins the strategy contract's table
(tests/test_strategies.py)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedtune import config
from fedtune.aggregation import RoundUpdates
from fedtune.experiment import Experiment
from strategies._robust import RobustRule
from strategies.bulyan import Bulyan
from strategies.centered_clipping import CenteredClipping
from strategies.median import CoordinateMedian
from strategies.multi_krum import MultiKrum
from strategies.norm_bounding import NormBounding
from strategies.trimmed_mean import TrimmedMean


def _aggregate(rule: RobustRule, rows: list[list[float]], server_round: int = 1) -> list[float]:
    """The rule's update for a round whose clients sent ``rows`` (one tensor ``w`` each)."""
    individual = tuple({"w": torch.tensor(row, dtype=torch.float64)} for row in rows)
    mean = {"w": torch.stack([u["w"] for u in individual]).mean(dim=0)}
    updates = RoundUpdates(mean, len(rows), individual, (1.0,) * len(rows), {"w": torch.zeros(len(rows[0]))})
    return rule.aggregate(updates, server_round)["w"].tolist()


def _median() -> None:
    assert _aggregate(CoordinateMedian(byzantine=1), [[1, 10], [2, -5], [100, 0]]) == [2, 0]
    assert _aggregate(CoordinateMedian(byzantine=1), [[1], [2], [3], [100]]) == [2.5]  # even: the middle two
    with pytest.raises(ValueError, match="at least 3 updates"):
        _aggregate(CoordinateMedian(byzantine=1), [[1], [2]])


def _trimmed_mean() -> None:
    assert _aggregate(TrimmedMean(byzantine=1), [[1, 0], [2, 0], [3, 0], [100, 9], [-50, 3]]) == [2, 1]
    assert _aggregate(TrimmedMean(byzantine=0), [[1], [2], [6]]) == [3]  # nothing trimmed: the mean


def _krum_reference(rows: np.ndarray, f: int, m: int, neighbours: int | None = None) -> np.ndarray:
    """Blanchard et al.'s definition written out: score = sum of squared distances to the n - f - 2 nearest."""
    n = len(rows)
    neighbours = n - f - 2 if neighbours is None else neighbours
    scores = []
    for i in range(n):
        distances = sorted(float(((rows[i] - rows[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(distances[:neighbours]))
    return rows[np.argsort(scores, kind="stable")[:m]].mean(axis=0)


def _multi_krum() -> None:
    rows = np.array([[0.0, 0.1], [0.1, 0.0], [-0.1, 0.05], [0.05, -0.1], [5.0, 5.0], [0.2, 0.2], [-3.0, 8.0]])
    for f, m in ((1, None), (1, 1), (2, 2)):
        expected = _krum_reference(rows, f, m or len(rows) - f)
        assert np.allclose(_aggregate(MultiKrum(byzantine=f, selected=m), rows.tolist()), expected, atol=1e-12)
    # spread-out rows on which counting one neighbour more or fewer picks another update
    spread = np.random.default_rng(3).normal(0, 1, (7, 2))
    picked = _krum_reference(spread, 1, 1)
    assert not np.allclose(picked, _krum_reference(spread, 1, 1, neighbours=3))
    assert not np.allclose(picked, _krum_reference(spread, 1, 1, neighbours=5))
    assert np.allclose(_aggregate(MultiKrum(byzantine=1, selected=1), spread.tolist()), picked, atol=1e-12)
    assert MultiKrum(byzantine=2).min_clients == 7 and MultiKrum(byzantine=1, selected=5).min_clients == 6


def _bulyan_reference(rows: np.ndarray, f: int) -> np.ndarray:
    """El Mhamdi et al.'s two stages written out with loops."""
    remaining, selection = list(range(len(rows))), []
    while len(selection) < len(rows) - 2 * f:
        k = len(remaining)
        scores = []
        for i in remaining:
            distances = sorted(float(((rows[i] - rows[j]) ** 2).sum()) for j in remaining if j != i)
            scores.append(sum(distances[: max(1, k - f - 2)]))
        selection.append(remaining.pop(int(np.argmin(scores))))
    chosen, beta = rows[selection], len(selection) - 2 * f
    result = []
    for column in chosen.T:
        median = float(np.median(column))
        result.append(np.mean(sorted(column, key=lambda v: abs(v - median))[:beta]))
    return np.array(result)


def _bulyan() -> None:
    generator = np.random.default_rng(0)
    rows = np.vstack([generator.normal(0, 0.1, (9, 3)), [[9.0, -9.0, 9.0]], [[0.3, 40.0, 0.0]]])
    for f in (1, 2):
        assert np.allclose(_aggregate(Bulyan(byzantine=f), rows.tolist()), _bulyan_reference(rows, f), atol=1e-12)
    assert Bulyan(byzantine=1).min_clients == 7


def _centered_clipping() -> None:
    rule = CenteredClipping(radius=1.0, iterations=1)
    # from 0: [3, 4] is clipped to [0.6, 0.8], [0, 0.1] counts in full
    assert np.allclose(_aggregate(rule, [[3, 4], [0, 0.1]]), [0.3, 0.45])
    # the next round starts from that centre: [0.3, 0.45] + mean(clip([2.7, 3.55]), clip([-0.3, -0.35]))
    diff = np.array([[2.7, 3.55], [-0.3, -0.35]])
    clipped = diff * np.minimum(1, 1.0 / np.linalg.norm(diff, axis=1, keepdims=True))
    assert np.allclose(_aggregate(rule, [[3, 4], [0, 0.1]], 2), np.array([0.3, 0.45]) + clipped.mean(axis=0))
    # null: the median distance to the centre is the radius (here 1, from 0): [30, 40] counts as [0.6, 0.8]
    assert np.allclose(_aggregate(CenteredClipping(iterations=1), [[30, 40], [0, 1], [0.6, 0.8]]), [0.4, 2.6 / 3])


def _norm_bounding() -> None:
    assert np.allclose(_aggregate(NormBounding(max_norm=1.0), [[3, 4], [0, 0.5]]), [0.3, 0.65])
    # null: the median norm (here 1) is the bound: [30, 40] -> [0.6, 0.8]
    assert np.allclose(_aggregate(NormBounding(), [[30, 40], [0, 1], [0.6, 0.8]]), [0.4, 2.6 / 3])


HAND_COMPUTED: dict[str, Callable[[], None]] = {
    "median": _median,
    "trimmed_mean": _trimmed_mean,
    "multi_krum": _multi_krum,
    "bulyan": _bulyan,
    "centered_clipping": _centered_clipping,
    "norm_bounding": _norm_bounding,
}

HONEST, BAD = 10, 1e6  # honest updates near 1 in every coordinate; bad ones as far away as they like


def _round_with_bad_updates(honest: int, bad: int, seed: int) -> tuple[np.ndarray, list[list[float]]]:
    generator = np.random.default_rng(seed)
    good = 1.0 + generator.normal(0, 0.05, (honest, 4))
    attackers = [[BAD * (-1) ** i, -BAD, BAD, 0.0] for i in range(bad)]
    return good, [*good.tolist(), *attackers]


@pytest.mark.parametrize(
    "rule",
    [CoordinateMedian(byzantine=2), TrimmedMean(byzantine=2), MultiKrum(byzantine=2), Bulyan(byzantine=2)],
    ids=lambda r: type(r).__name__,
)
def test_a_voting_rule_with_f_bad_updates_stays_within_the_honest_values(rule: RobustRule) -> None:
    """With n = its min_clients and f of them arbitrary, every coordinate stays in the honest updates' range
    (Krum and Bulyan select only honest ones here); FedAvg's mean is dragged to about f/n x 1e6."""
    bad = rule.byzantine
    for seed in range(3):
        good, rows = _round_with_bad_updates(rule.min_clients - bad, bad, seed)
        result = np.array(_aggregate(rule, rows))
        assert (good.min(axis=0) - 1e-12 <= result).all() and (result <= good.max(axis=0) + 1e-12).all()
        assert np.abs(np.mean(rows, axis=0)).max() > 1e4


@pytest.mark.parametrize("rule", [CenteredClipping(radius=0.5, iterations=3), NormBounding(max_norm=2.5)])
def test_a_clipping_rule_bounds_what_each_bad_update_can_move(rule: RobustRule) -> None:
    """Replacing f of n honest updates by arbitrary ones moves the result by at most 2 f bound / n per clipping
    pass (norm bounding: one; centered clipping: one per iteration, each a non-expansive map of the centre)."""
    bound, passes = (rule.radius, rule.iterations) if isinstance(rule, CenteredClipping) else (rule.max_norm, 1)
    good, rows = _round_with_bad_updates(8, 2, seed=0)
    honest_only = [*good.tolist(), *good[:2].tolist()]  # the same round with the 2 bad updates honest instead
    clean = np.array(_aggregate(type(rule)(bound), honest_only))  # fresh rules: no history
    attacked = np.array(_aggregate(type(rule)(bound), rows))
    assert np.linalg.norm(attacked - clean) <= passes * 2 * 2 * bound / 10 + 1e-9
    assert np.linalg.norm(np.mean(rows, axis=0) - np.mean(honest_only, axis=0)) > 1e4  # what the mean does


@pytest.mark.parametrize("name", sorted(HAND_COMPUTED))
def test_a_robust_rule_is_refused_at_start_when_a_round_may_be_too_small(name: str) -> None:
    """Krum with f = 2 needs 7 updates: min_train_clients=2 would let a round apply it with 2 (no guarantee)."""
    cfg = config.compose([f"strategy={name}", "federation.num_clients=10", "federation.min_train_clients=2"])
    rule = config.instantiate(cfg.strategy)
    if rule.min_clients <= 2:
        Experiment(cfg).check_composition()
        return
    with pytest.raises(ValueError, match=f"federation.min_train_clients to {rule.min_clients}"):
        Experiment(cfg).check_composition()
    raised = config.compose(
        [f"strategy={name}", "federation.num_clients=10", f"federation.min_train_clients={rule.min_clients}"]
    )
    Experiment(raised).check_composition()


def test_krum_scores_stay_exact_for_many_updates_far_from_the_origin() -> None:
    """30 updates (past the 25 rows where cdist would switch to |a|^2 + |b|^2 - 2ab) at norm 1e6, 1e-3 apart:
    the scores match the definition's, so the one picked is the reference's."""
    generator = np.random.default_rng(4)
    rows = 1e6 + generator.normal(0, 1e-3, (30, 8))
    picked = _aggregate(MultiKrum(byzantine=3, selected=1), rows.tolist())
    assert np.allclose(picked, _krum_reference(rows, 3, 1), rtol=0, atol=1e-9)


def test_krum_is_invariant_to_the_order_of_clients_up_to_ties() -> None:
    rows = np.random.default_rng(1).normal(0, 1, (6, 3)).tolist()
    results = {tuple(np.round(_aggregate(MultiKrum(byzantine=1), list(p)), 12)) for p in itertools.permutations(rows)}
    assert len(results) == 1


def test_a_median_bound_is_not_inflated_by_a_minority() -> None:
    """With the bound left to the round's median norm, 4 of 10 updates of norm 1e6 still count as norm-1 ones."""
    rows = [[1.0, 0.0]] * 6 + [[1e6, 0.0]] * 4
    assert np.allclose(_aggregate(NormBounding(), rows), [1.0, 0.0])
    assert np.allclose(_aggregate(CenteredClipping(iterations=1), rows), [1.0, 0.0])
