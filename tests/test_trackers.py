"""Experiment trackers (``tracker=``): TensorBoard's and MLflow's own files, read back with their own libraries,
hold every metric line of the run's metrics.jsonl and its config, also across a crash and a resume.

Each tracker gets one tiny run through the real server loop and ClientApp (in-process nodes) that loses a node
in round 2 (the round fails) and is then resumed to the end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedtune import cli, config
from fedtune.ledger import audit
from fedtune.run_dir import RunDir
from fedtune.server_app import RoundFailedError
from fedtune.trackers import MLflow
from tests.conftest import tiny_overrides
from tests.nodes import federate


def _crash(tiny_bert_dir: Path, root: Path, *extra: str) -> list[str]:
    """Run 3 rounds of which round 2 fails (a node is lost); returns the run's overrides."""
    overrides = tiny_overrides(tiny_bert_dir, root / "run", "federation.num_rounds=3", *extra)
    with pytest.raises(RoundFailedError):
        federate(root, overrides, 2, failures={"hospital-1": [(2, "train")]})
    return overrides


def _resume(root: Path, overrides: list[str]) -> RunDir:
    return RunDir(federate(root, [*overrides, "resume=true"], 2))


def _expected(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as ``<scope>/<metric>`` -> [(round, value)]."""
    series = defaultdict(list)
    for line in run.read_metrics():
        series[f"{line['scope']}/{line['metric']}"].append((line["round"], line["value"]))
    return dict(series)


def _flat(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def test_tensorboard_event_file_holds_every_metric_line_and_the_config(tiny_bert_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run = _resume(tmp_path, _crash(tiny_bert_dir, tmp_path, "tracker=tensorboard"))
    assert audit(run.path) == []  # the tracker's files sit beside the run's records and change none of them
    log_dir = run.path / "tensorboard"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1  # the resume wrote the record again
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    expected = _expected(run)
    assert {"client:hospital-0/update_norm", "central/accuracy", "train/train_loss"} <= set(expected)
    assert sorted(events.Tags()["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        found = [(e.step, e.value) for e in events.Scalars(tag)]
        assert found == [(step, float(np.float32(value))) for step, value in points], tag  # TensorBoard keeps float32
    config_yaml = (run.path / "config.yaml").read_text()
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "".join(line.removeprefix("    ") + "\n" for line in text.splitlines()) == config_yaml
    start = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["lora.r"].number_value == 8 and hparams["model.path"].string_value == str(tiny_bert_dir)
    assert len(hparams) == len(_flat(yaml.safe_load(config_yaml)))


def test_mlflow_run_holds_every_metric_line_and_the_config(
    tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the default store, inside the run directory; the resume goes on with the same MLflow run."""
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY", raising=False)
    overrides = _crash(tiny_bert_dir, tmp_path, "tracker=mlflow")
    from mlflow import MlflowClient

    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"  # set before MLflow was imported: no usage reports
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'run' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedtune")
    assert experiment is not None
    (crashed,) = client.search_runs([experiment.experiment_id])
    assert crashed.info.status == "FAILED" and crashed.data.metrics["central/accuracy"] is not None
    run = _resume(tmp_path, overrides)
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_id == crashed.info.run_id and found.info.status == "FINISHED"
    assert found.info.run_name == str(run.path) and audit(run.path) == []
    _assert_holds(client, found.info.run_id, run)
    config_yaml = (run.path / "config.yaml").read_text()
    settings = _flat(yaml.safe_load(config_yaml))
    assert set(found.data.params) == set(settings) and found.data.params["lora.r"] == "8"
    for key, value in settings.items():  # a string as it is, anything else as text that reads back the same
        param = found.data.params[key]
        assert (param if isinstance(value, str) else yaml.safe_load(param)) == value, key
    downloaded = client.download_artifacts(found.info.run_id, "config.yaml", str(tmp_path / "download"))
    assert Path(downloaded).read_text() == config_yaml
    assert Path(experiment.artifact_location.removeprefix("file://")).is_relative_to(run.path)


def test_mlflow_chosen_on_resume_gets_the_lines_so_far_in_a_store_of_the_user_s(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run resumed with tracker=mlflow (the tracker trains nothing, so it may change) and a relative path of
    the user's own SQLite store: a new MLflow run there holds the metric lines logged before it."""
    monkeypatch.chdir(tmp_path)
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    shutil.copy(tiny_run / "config.yaml", run.path / "config.yaml")
    shutil.copy(tiny_run / "metrics.jsonl", run.metrics_file)
    session = MLflow(tracking_uri="stores/all-runs.db", experiment="tiny").open(run.path, run.read_metrics(), True)
    session.close(failed=False)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'stores' / 'all-runs.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert json.loads((run.path / "mlflow_run.json").read_text())["run_id"] == found.info.run_id
    _assert_holds(client, found.info.run_id, run)


def _assert_holds(client: Any, run_id: str, run: RunDir) -> None:
    """The MLflow run's metric histories are metrics.jsonl's lines, value for value."""
    expected = _expected(run)
    assert {"central/accuracy", "train/train_loss"} <= set(expected) and any(k.startswith("client:") for k in expected)
    assert set(client.get_run(run_id).data.metrics) == set(expected)
    for key, points in expected.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, key)] == points, key


def test_a_wrong_tracker_setting_is_one_config_error_naming_it(
    tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cases = [
        (["tracker=wandb"], "Unknown config option 'tracker/wandb'. Available tracker options: mlflow, none, tensorboard."),
        (["tracker=mlflow", "tracker.trackin_uri=runs/mlflow.db"], "Unknown config key 'tracker.trackin_uri'. Did you mean 'tracker.tracking_uri'?"),
        (["tracker=mlflow", "tracker.tracking_uri=ftp://host/store"], "tracker.tracking_uri='ftp://host/store': give a local SQLite file"),
        (["tracker=tensorboard"], "tracker=tensorboard needs the tensorboard package, which is not installed: pip install 'fedtune[trackers]'"),
    ]  # fmt: skip
    find_spec = importlib.util.find_spec  # the last case: a server without TensorBoard
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else find_spec(name, *a)
    )
    for extra, message in cases:
        assert cli.main(["run", *tiny_overrides(tiny_bert_dir, tmp_path / "run", *extra)]) == 2
        error = capsys.readouterr().err
        assert error.startswith("fedtune: config error:") and message in error and error.count("\n") == 1, error
        assert not (tmp_path / "run").exists()


def test_the_tracker_is_not_part_of_the_experiment(tiny_bert_dir: Path) -> None:
    """Nodes pin the experiment hash, and a run may resume with another tracker: it trains nothing."""
    overrides = tiny_overrides(tiny_bert_dir, Path("unused"))
    plain = config.experiment_hash(config.compose(overrides))
    for tracker in ("tensorboard", "mlflow"):
        assert config.experiment_hash(config.compose([*overrides, f"tracker={tracker}"])) == plain
