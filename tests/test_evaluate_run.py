"""``fedtune evaluate``: a site checks a run's final adapter on its own file, on its own machine.

The reference is what the server measured during the run (metrics.jsonl): the run's central test set,
evaluated again, gives the same numbers; so does a site's CSV holding those rows with their labels as names
(whose alphabetical order is not the run's id order, so a wrong label mapping would show). The adapter is
refused with another base model's weights, and only the data and the model's path may change.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from fedtune import cli, config
from fedtune.experiment import get_experiment
from fedtune.finished_run import load_run
from fedtune.report import final_central
from fedtune.run_dir import RunDir
from tests.conftest import tiny_overrides
from tests.nodes import federate


@pytest.fixture(scope="module")
def run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-round run of the tiny experiment (in-process nodes)."""
    root = tmp_path_factory.mktemp("evaluate")
    return federate(root, tiny_overrides(tiny_bert_dir, root / "run"), 2, prefix="partition")


def _site_file(run: Path, target: Path) -> Path:
    """The rows the run's central evaluation used, as a site's CSV with its own column names and label names."""
    experiment = get_experiment(config.compose(tiny_overrides(Path(_model_path(run)), run)))
    rows = experiment.test_set.select(range(experiment.train_config.eval_max_examples))
    names = experiment.label_names
    assert sorted(names) != list(names)  # ids are not alphabetical: a mapping by sorted names would be wrong
    with open(target, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["note", "chapter"])
        writer.writerows((text, names[label]) for text, label in zip(rows["text"], rows["label"], strict=True))
    return target


def _model_path(run: Path) -> str:
    """The base model the run trained on, as its saved config names it."""
    return str(OmegaConf.load(run / "config.yaml").model.path)


def _evaluate(run: Path, *overrides: str, out: Path) -> dict:
    assert cli.main(["evaluate", str(run), *overrides, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_the_run_s_own_test_set_gives_the_run_s_numbers(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _evaluate(run, out=tmp_path / "result.json")
    reference = final_central(RunDir(run).read_metrics())
    assert result["server_round"] == 2 and result["run_central"] == reference
    assert result["metrics"] == pytest.approx(reference, abs=1e-6)
    assert "Final adapter of" in capsys.readouterr().out


def test_a_site_s_own_file_with_label_names(run: Path, tmp_path: Path) -> None:
    site = _site_file(run, tmp_path / "heldout.csv")
    before = sorted(p.name for p in run.rglob("*"))
    result = _evaluate(
        run,
        "data=local",
        f"data.loader.path={site}",
        "data.loader.text_column=note",
        "data.loader.label_column=chapter",
        out=tmp_path / "result.json",
    )
    assert result["source"] == str(site) and result["rows"] == 48
    assert result["metrics"] == pytest.approx(final_central(RunDir(run).read_metrics()), abs=1e-6)
    assert 0 < result["majority"]["accuracy"] < 1
    assert sorted(p.name for p in run.rglob("*")) == before  # nothing written to the run directory


def test_a_plain_text_run_on_a_site_s_own_documents(tiny_plain_text_run: Path, tmp_path: Path) -> None:
    """The run's central test documents in a site's JSONL under another column name give the run's loss and
    perplexity (and nothing else: no exact match, no majority label), as does the run's own test set."""
    run = tiny_plain_text_run
    experiment = load_run(run).experiment
    rows = experiment.test_set.select(range(experiment.train_config.eval_max_examples))
    site = tmp_path / "reports.jsonl"
    site.write_text("".join(json.dumps({"report": text}) + "\n" for text in rows["text"]))
    reference = final_central(RunDir(run).read_metrics())
    assert set(reference) == {"loss", "perplexity"}
    overrides = ["data=local", f"data.loader.path={site}", "data.loader.text_column=report"]
    result = _evaluate(run, *overrides, out=tmp_path / "result.json")
    assert result["rows"] == 48 and result["majority"] is None
    assert result["metrics"] == pytest.approx(reference, abs=1e-6)
    assert _evaluate(run, out=tmp_path / "own.json")["metrics"] == pytest.approx(reference, abs=1e-6)


def test_a_copy_of_the_base_model_elsewhere_and_other_weights(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = Path(shutil.copytree(_model_path(run), tmp_path / "site-model"))
    result = _evaluate(run, f"model.path={copy}", out=tmp_path / "result.json")
    assert result["metrics"] == pytest.approx(final_central(RunDir(run).read_metrics()), abs=1e-6)

    weights = load_file(copy / "model.safetensors")
    first = sorted(weights)[0]
    save_file({**weights, first: weights[first] + 1e-3}, copy / "model.safetensors", metadata={"format": "pt"})
    assert cli.main(["evaluate", str(run), f"model.path={copy}"]) == 2
    assert "trained on another base model" in capsys.readouterr().err


def test_only_the_data_and_the_model_path_may_change(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["evaluate", str(run), "lora.r=4"]) == 2
    assert "not 'lora.r'" in capsys.readouterr().err


def test_labels_the_run_never_trained_on(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "heldout.csv"
    site.write_text("note,chapter\nfever,Neoplasms\nrash,Dermatology\n")
    overrides = ["data=local", f"data.loader.path={site}", "data.loader.text_column=note"]
    assert cli.main(["evaluate", str(run), *overrides, "data.loader.label_column=chapter"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtune: data error: labels ['Dermatology'] in column 'chapter'") and (
        "are not among the 22 classes the run trained on" in err
    )
