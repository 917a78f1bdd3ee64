"""benchmarks/robustness.py sets each rule up as its guarantee needs and reports fairly: a rule runs only with
enough hospitals, and every ratio compares runs over the same seeds."""

from __future__ import annotations

import importlib
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
robustness = importlib.import_module("robustness")


def test_each_rule_asks_for_the_round_its_paper_needs() -> None:
    # n >= 2f+1 (Yin et al.), 2f+3 (Blanchard et al.), 4f+3 (El Mhamdi et al.), written out by hand here
    for rule, f, needed in [("median", 2, 5), ("trimmed_mean", 3, 7), ("multi_krum", 2, 7), ("bulyan", 1, 7)]:
        overrides = robustness.rule_overrides(rule, f, 0.0)
        assert f"strategy.byzantine={f}" in overrides
        assert f"federation.min_train_clients={needed}" in overrides
    assert robustness.rule_overrides("norm_bounding", 2, 4.5) == ["strategy=norm_bounding", "strategy.max_norm=4.5"]


def test_a_rule_is_left_out_where_ten_hospitals_are_too_few_for_it() -> None:
    grid = robustness.jobs(["sign_flip"], ["bulyan", "median"], [1, 2], [0], "reduced", "/tmp", 1.0)
    names = {job["name"] for job in grid}
    assert {"bulyan-clean-f1-s0", "bulyan-sign_flip-1-s0"} <= names  # 10 >= 4*1+3
    bulyan = [job for job in grid if job["rule"] == "bulyan"]
    assert all("strategy.byzantine=1" in job["overrides"] for job in bulyan)  # set for 2, it needs 11 > 10
    assert {"median-sign_flip-1-s0", "median-sign_flip-2-s0"} <= names
    assert all(job["scale"] == "reduced" for job in grid)


def run(rule: str, attack: str, malicious: int, seed: int, f1: float) -> dict:
    """A finished run as run_one reports it, set for ``malicious`` bad updates (1 without attackers)."""
    overrides = robustness.rule_overrides(rule, max(malicious, 1), 1.0)
    return {"rule": rule, "attack": attack, "malicious": malicious, "seed": seed, "overrides": overrides,
            "macro_f1": f1, "backdoor_success": 0.0, "abandoned_rounds": 0}  # fmt: skip


def test_ratios_and_spread_use_the_seeds_each_count_ran() -> None:
    clean = [run("fedavg", "none", 0, seed, f1) for seed, f1 in [(0, 0.40), (1, 0.50), (2, 0.60)]]
    attacked = [run("fedavg", "sign_flip", 1, 0, 0.20)]  # one attacker: seed 0 only
    attacked += [run("fedavg", "sign_flip", 2, seed, f1) for seed, f1 in [(0, 0.10), (1, 0.20), (2, 0.30)]]
    rows = robustness.summarise(clean + attacked, [1, 2])
    one = next(r for r in rows if r["table_malicious"] == 1 and r["attack"] == "sign_flip")
    assert one["seeds"] == [0] and one["vs_fedavg_clean"] == 0.20 / 0.40  # not over clean seeds 1 and 2
    none_one = next(r for r in rows if r["table_malicious"] == 1 and r["attack"] == "none")
    assert none_one["seeds"] == [0] and none_one["macro_f1_mean"] == 0.40
    two = next(r for r in rows if r["table_malicious"] == 2 and r["attack"] == "sign_flip")
    assert two["seeds"] == [0, 1, 2]
    assert two["macro_f1_std"] == statistics.stdev([0.10, 0.20, 0.30])
    assert abs(two["vs_fedavg_clean"] - 0.20 / 0.50) < 1e-12
    lines = robustness.table(rows, ["fedavg", "bulyan"]).splitlines()
    assert "| sign_flip | 2 | 0,1,2 | 0.200 ± 0.100 (0.40x) | needs 11 hospitals |" in lines
    assert "| sign_flip | 1 | 0 | 0.200 (0.50x) |  |" in lines


def test_clean_runs_alone_make_a_table_of_what_each_rule_costs() -> None:
    results = [run(rule, "none", 0, seed, 0.5 + 0.1 * seed) for rule in ("fedavg", "median") for seed in (0, 1)]
    rows = robustness.summarise(results, [1])
    assert {(r["rule"], r["attack"], tuple(r["seeds"])) for r in rows} == {
        ("fedavg", "none", (0, 1)),
        ("median", "none", (0, 1)),
    }
    assert all(r["vs_fedavg_clean"] == 1.0 for r in rows)
