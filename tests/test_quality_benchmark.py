"""benchmarks/quality.py compares arms fairly: the same split, equal compute, no test row in training, and
the DP arms spend the epsilon they are labelled with, over the rows they train on."""

from __future__ import annotations

import importlib
import json
import statistics
import sys
from pathlib import Path

import pytest

from fedtune import config
from fedtune.experiment import get_experiment
from tests.conftest import tiny_overrides

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
quality = importlib.import_module("quality")  # a script beside compare_strategies.py, which it imports


def test_the_arms_train_on_the_federations_rows_at_equal_compute(tiny_bert_dir: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_bert_dir, tmp_path, "federation.num_clients=3", "train.local_steps=5")
    experiment = get_experiment(config.compose(overrides))
    central, *alone = quality.solo_arms(experiment)
    hospitals = [experiment.client_data(partition) for partition in range(3)]
    assert [arm.rows.train["text"] for arm in alone] == [data.train["text"] for data in hospitals]
    assert sorted(central.rows.train["text"]) == sorted(t for data in hospitals for t in data.train["text"])
    assert not set(central.rows.train["text"]) & set(experiment.test_set["text"])  # nothing of the test set
    rounds = experiment.federation.num_rounds
    assert [arm.steps for arm in alone] == [rounds * 5] * 3  # what each hospital takes in the federation
    assert central.steps == 3 * rounds * 5  # the federation's total


def test_a_dp_arm_spends_its_epsilon_over_the_rows_it_trains_on(tiny_bert_dir: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_bert_dir, tmp_path, "privacy=dp_sgd", "privacy.target_epsilon=3")
    experiment = get_experiment(config.compose(overrides))
    central, hospital, _ = quality.solo_arms(experiment)
    for arm in (central, hospital):
        result = quality.train_alone(overrides, arm, experiment.test_set, quality.SCORINGS["classification"])
        assert result["train_rows"] == len(arm.rows.train) and result["steps"] == arm.steps
        assert 2.7 < result["epsilon"] <= 3.0  # calibrated for exactly these steps on these rows
        assert 0.0 <= result["macro_f1"] <= 1.0


def test_each_arm_trains_what_the_strategy_trains(tiny_bert_dir: Path, tmp_path: Path) -> None:
    trained = {}
    for strategy in ("fedavg", "head_only"):
        overrides = tiny_overrides(tiny_bert_dir, tmp_path, f"strategy={strategy}", "train.local_steps=2")
        experiment = get_experiment(config.compose(overrides))
        head = sum(t.numel() for key, t in experiment.initial_adapter().items() if "lora_" not in key)
        hospital = quality.solo_arms(experiment)[1]
        trained[strategy] = quality.train_alone(overrides, hospital, experiment.test_set, quality.scoring_of(overrides))
    assert trained["head_only"]["trained_values"] == head  # linear probing alone: the LoRA matrices stay
    assert trained["fedavg"]["trained_values"] > head


def test_the_grid_runs_every_combination_and_each_arm_is_shown_at_its_best() -> None:
    assert quality.grid_points(["strategy=fedavg,head_only", "train.lr=0.1"]) == [
        ["strategy=fedavg", "train.lr=0.1"],
        ["strategy=head_only", "train.lr=0.1"],
    ]
    assert quality.grid_points([]) == [[]]
    summary = {"macro_f1_mean": 0.0}
    by_point = {
        "a": {"centralized": {**summary, "macro_f1_mean": 0.6}, "federated": {**summary, "macro_f1_mean": 0.2}},
        "b": {"centralized": {**summary, "macro_f1_mean": 0.5}, "federated": {**summary, "macro_f1_mean": 0.4}},
    }
    assert quality.best_points(by_point, quality.SCORINGS["classification"]) == {"centralized": "a", "federated": "b"}


def test_a_causal_lm_is_judged_by_perplexity_lower_better(tiny_llama_dir: Path, tmp_path: Path) -> None:
    causal = ("data=icd10_instructions", "model.task=causal_lm", "train.generation_examples=2")
    overrides = tiny_overrides(tiny_llama_dir, tmp_path, *causal, "train.local_steps=2")
    scoring = quality.scoring_of(overrides)
    assert scoring.metrics == ("perplexity", "exact_match", "answer_accuracy") and not scoring.higher
    experiment = get_experiment(config.compose(overrides))
    hospital = quality.solo_arms(experiment)[1]
    result = quality.train_alone(overrides, hospital, experiment.test_set, scoring)
    reference = experiment.evaluate(experiment.initial_adapter(), experiment.test_set)
    assert (
        result["perplexity"] > 1.0 and 0.0 <= result["exact_match"] <= 1.0 and 0.0 <= result["answer_accuracy"] <= 1.0
    )
    assert result["perplexity"] != reference["perplexity"]  # it trained
    # the best point and the best hospital are those of the lowest perplexity; the worst seed is the highest
    by_point = {"a": {"federated": {"perplexity_mean": 9.0}}, "b": {"federated": {"perplexity_mean": 7.0}}}
    assert quality.best_points(by_point, scoring) == {"federated": "b"}
    seeds = [{f"hospital-{i}": {"perplexity": 10.0 - i - seed, "exact_match": 0.1 * i + 0.1 * seed}
              for i in range(3)} for seed in range(2)]  # fmt: skip
    summary = quality.summarise(seeds, scoring)
    assert summary["best hospital alone"]["perplexity_mean"] == statistics.mean([8.0, 7.0])
    assert summary["best hospital alone"]["perplexity_worst"] == 8.0
    assert summary["best hospital alone"]["exact_match_mean"] == pytest.approx(0.25)
    assert summary["best hospital alone"]["exact_match_worst"] == pytest.approx(0.2)  # higher is better here
    assert "answer_accuracy_mean" not in summary["best hospital alone"]  # not recorded: no closed answer set
    with pytest.raises(SystemExit, match="model.task=plain_text"):
        quality.scoring_of([*overrides, "model.task=plain_text"])


def test_a_tuned_run_runs_each_arm_at_the_point_its_search_found_best() -> None:
    best = {"centralized": "lr=1", "federated": "lr=2", "best hospital alone": "lr=1", "hospital-0": "lr=2"}
    assert quality.arms_at_best(best) == {"lr=1": ("centralized", "hospitals"), "lr=2": ("federated",)}


def test_a_search_split_into_parts_is_merged_and_must_share_its_overrides() -> None:
    part = {"overrides": ["seed=0"], "grid": ["lr=1,2"], "summary": {"none": {"lr=1": {"centralized": {}}}}}
    other = {"overrides": ["seed=0"], "grid": ["lr=3"], "summary": {"none": {"lr=3": {"centralized": {}}}}}
    base, grid, summaries = quality.merge_searches([part, other])
    assert base == ["seed=0"] and grid == ["lr=1,2", "lr=3"] and set(summaries["none"]) == {"lr=1", "lr=3"}
    with pytest.raises(SystemExit, match="different --extra"):
        quality.merge_searches([part, {**other, "overrides": ["seed=1"]}])


def test_runs_under_other_privacy_settings_combine_into_one_table(tmp_path: Path) -> None:
    def record(privacy: str, seeds: list[int], f1: float) -> dict:
        arms = {"centralized": {"macro_f1": f1, "accuracy": 0.9}, "federated": {"macro_f1": f1 / 2, "accuracy": 0.5}}
        return {"overrides": [], "grid": ["lr=1"], "seeds": seeds, "runs": {privacy: {"lr=1": [arms] * len(seeds)}}}

    paths = []
    for name, content in (("none", record("privacy=none", [1, 2, 3], 0.8)), ("eps1", record("eps=1", [1], 0.4))):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(content))
    quality.combine(paths, tmp_path / "all.json")
    table = (tmp_path / "all.md").read_text()
    assert "privacy=none (3 seeds)" in table and "eps=1 (1 seeds)" in table
    assert "| federated | 0.400 ± 0.000 (0.400) / 0.500 ± 0.000 at `lr=1` | 0.200 ± " in table
    assert (tmp_path / "all.png").is_file()
    with pytest.raises(SystemExit, match="seed in common"):
        quality.combine([paths[0], paths[0]], tmp_path / "twice.json")
    later = tmp_path / "eps1_later.json"  # epsilon 1 on two more seeds, run later: pooled into one column
    later.write_text(json.dumps(record("eps=1", [2, 3], 0.1)))
    quality.combine([*paths, later], tmp_path / "pooled.json")
    pooled = json.loads((tmp_path / "pooled.json").read_text())["summary"]["eps=1"]["lr=1"]["centralized"]
    assert pooled["seeds"] == 3 and pooled["macro_f1_mean"] == pytest.approx(0.2)  # (0.4 + 0.1 + 0.1) / 3
    assert pooled["macro_f1_std"] == pytest.approx(statistics.stdev([0.4, 0.1, 0.1]))
    with pytest.raises(SystemExit, match="other --extra overrides"):
        later.write_text(json.dumps({**record("eps=1", [4], 0.1), "overrides": ["seed=9"]}))
        quality.combine([*paths, later], tmp_path / "mixed.json")
