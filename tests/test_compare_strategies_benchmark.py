"""benchmarks/compare_strategies.py reports every strategy over the seeds it ran, after every run, so that a
comparison cut short keeps what it finished."""

from __future__ import annotations

import importlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
compare_strategies = importlib.import_module("compare_strategies")


def _run(seed: int, macro_f1: float, upload: float) -> dict[str, float]:
    return {
        "seed": seed,
        "macro_f1": macro_f1,
        "accuracy": macro_f1 + 0.1,
        "federated_macro_f1": macro_f1 - 0.1,
        "untrained_macro_f1": 0.02,
        "untrained_accuracy": 0.08,
        "upload_bytes_per_client": upload,
        "download_bytes_per_client": upload,
        "round_seconds": 1.0,
    }


def test_a_comparison_cut_short_reports_each_strategy_over_its_own_seeds(tmp_path: Path) -> None:
    # seed 1 finished FedAvg, then the run stopped before FFA-LoRA's seed 1
    runs = {"fedavg": [_run(0, 0.70, 300e3), _run(1, 0.60, 300e3)], "ffa_lora": [_run(0, 0.62, 150e3)]}
    out = tmp_path / "comparison.json"
    compare_strategies.write_report(runs, ["federation.num_rounds=6"], [], out)

    written = json.loads(out.read_text())
    assert written["seeds"] == {"fedavg": [0, 1], "ffa_lora": [0]}
    fedavg, ffa = written["summary"]["fedavg"], written["summary"]["ffa_lora"]
    assert fedavg["macro_f1_mean"] == statistics.mean([0.70, 0.60])
    assert fedavg["macro_f1_std"] == statistics.stdev([0.70, 0.60])
    assert fedavg["macro_f1_min"] == 0.60
    assert (ffa["seeds"], ffa["macro_f1_mean"], ffa["macro_f1_std"]) == (1, 0.62, 0.0)
    table = out.with_suffix(".md").read_text()
    assert table.index("`fedavg`") < table.index("`ffa_lora`")  # the better mean first
    assert "| 150.0 kB | 0.50x |" in table  # upload against FedAvg's
    assert out.with_suffix(".png").stat().st_size > 0
