"""``fedtune compare``: runs side by side, by the config keys that differ, seeds folded into mean and spread.

Three tiny runs: two differing only by seed (one group, mean and sample standard deviation of their final
central metrics) and one with another LoRA rank (a group of one, no spread). The reference numbers are
read from each run's metrics.jsonl here.
"""

from __future__ import annotations

import csv
import shutil
import statistics
from pathlib import Path

import pytest

from fedtune import cli, compare
from fedtune.report import final_central
from fedtune.run_dir import RunDir
from tests.conftest import tiny_overrides
from tests.nodes import federate


@pytest.fixture(scope="module")
def sweep(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of three runs, as `fedtune run --multirun` leaves one."""
    root = tmp_path_factory.mktemp("sweep")
    for name, extra in (("0", ["seed=0"]), ("1", ["seed=1"]), ("2", ["seed=0", "lora.r=4"])):
        work = root / "work" / name
        run = federate(work, tiny_overrides(tiny_bert_dir, work / "run", "federation.num_rounds=1", *extra), 2)
        shutil.move(run, root / "sweep" / name)
    return root / "sweep"


def test_runs_differing_by_seed_are_folded(sweep: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["compare", str(sweep), "--out", str(tmp_path)]) == 0
    with open(tmp_path / "compare.csv") as handle:
        rows = {row["lora.r"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"8", "4"}  # the differing key (seed folded); run_dir is no difference
    finals = {name: final_central(RunDir(sweep / name).read_metrics()) for name in ("0", "1", "2")}
    folded = rows["8"]
    assert folded["seeds"] == "2" and rows["4"]["seeds"] == "1"
    for metric in ("loss", "accuracy", "macro_f1"):
        values = [finals["0"][metric], finals["1"][metric]]
        assert float(folded[f"{metric}_mean"]) == pytest.approx(statistics.mean(values))
        assert float(folded[f"{metric}_std"]) == pytest.approx(statistics.stdev(values))
        assert (
            float(rows["4"][f"{metric}_mean"]) == pytest.approx(finals["2"][metric]) and not rows["4"][f"{metric}_std"]
        )
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| lora.r | seeds | accuracy | loss | macro_f1 |" and " ± " in printed
    assert (tmp_path / "compare.md").read_text() == printed
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_a_folder_without_runs_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["compare", str(tmp_path)]) == 2
    assert "is neither a run directory (config.yaml) nor a folder of them" in capsys.readouterr().err


def test_runs_differing_only_in_bookkeeping_are_one_group(tmp_path: Path) -> None:
    """Run directory, resume and the experiment tracker train nothing: seeds of one experiment fold together."""
    runs = [
        compare.Run(tmp_path / name, {"seed": seed, "run_dir": name, "tracker._target_": tracker}, {"loss": loss}, {})
        for name, seed, tracker, loss in (("a", "0", "NoTracker", 1.0), ("b", "1", "MLflow", 3.0))
    ]
    keys, groups = compare.compare(runs)
    assert keys == ["seed"] and len(groups) == 1 and groups[0].mean == {"loss": 2.0}
