"""What each process derives from a config: data of simulated clients and of deployed nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune import config
from fedtune.evaluation import answer_accuracy
from fedtune.experiment import Experiment
from fedtune.finished_run import load_run


def _csv(path: Path, labels: list[str]) -> Path:
    path.write_text("note,dx\n" + "".join(f"note {i} about {label},{label}\n" for i, label in enumerate(labels)))
    return path


def test_nodes_with_different_label_sets_number_classes_the_same_way(tiny_bert_dir: Path, tmp_path: Path) -> None:
    server_file = _csv(tmp_path / "server.csv", ["cardio", "derm", "neuro"] * 4)
    node_file = _csv(tmp_path / "node.csv", ["neuro", "cardio"] * 10)  # this hospital has no dermatology
    cfg = config.compose([
        "model=local", f"model.path={tiny_bert_dir}", "data=local", f"data.loader.path={server_file}",
        "data.loader.text_column=note", "data.loader.label_column=dx", "data.loader.label_names=[cardio,derm,neuro]",
        f"run_dir={tmp_path / 'run'}",
    ])  # fmt: skip
    experiment = Experiment(cfg)
    data = experiment.node_data(str(node_file))
    rows = list(data.train) + list(data.val)
    assert len(rows) == 20 and len(data.val) == 2  # val_fraction 0.1, disjoint, nothing lost
    assert all(row["label"] == (2 if "neuro" in row["text"] else 0) for row in rows)
    assert experiment.num_labels == 3


def test_node_data_without_declared_labels_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    server_file = _csv(tmp_path / "server.csv", ["a", "b"] * 4)
    cfg = config.compose([
        "model=local", f"model.path={tiny_bert_dir}", "data=local", f"data.loader.path={server_file}",
        "data.loader.text_column=note", "data.loader.label_column=dx", f"run_dir={tmp_path / 'run'}",
    ])  # fmt: skip
    with pytest.raises(ValueError, match=r"data\.loader\.label_names"):
        Experiment(cfg).node_data(str(server_file))


def test_simulated_clients_get_disjoint_partitions(tiny_bert_dir: Path, tmp_path: Path) -> None:
    cfg = config.compose([
        "model=local", f"model.path={tiny_bert_dir}", "data.loader.max_examples=300", "data.test_size=50",
        "federation.num_clients=3", "partition=iid", f"run_dir={tmp_path / 'run'}",
    ])  # fmt: skip
    experiment = Experiment(cfg)
    texts = [
        set(experiment.client_data(i).train["text"]) | set(experiment.client_data(i).val["text"]) for i in range(3)
    ]
    assert not (texts[0] & texts[1]) and not (texts[1] & texts[2]) and not (texts[0] & texts[2])
    assert sum(map(len, texts)) == len(experiment.pool) == 250
    assert not set(experiment.test_set["text"]) & set().union(*texts)  # the central test set is held out


def test_a_causal_corpus_that_names_its_answers_is_scored_by_answer_accuracy(tiny_causal_run: Path) -> None:
    """icd10_instructions names its answers (the chapters): the server and the clients report answer accuracy
    beside exact match, and the server's last value is that of the final adapter on the central test rows."""
    lines = [json.loads(line) for line in (tiny_causal_run / "metrics.jsonl").read_text().splitlines() if line]
    scored = [line for line in lines if line["metric"] == "answer_accuracy"]
    assert {"central", "federated"} <= {line["scope"] for line in scored}
    run = load_run(tiny_causal_run)
    experiment = run.experiment
    rows = experiment.test_set.select(range(experiment.train_config.generation_examples))
    final = answer_accuracy(run.model(), rows, experiment.tokenizer, experiment.label_names)
    assert [line["value"] for line in scored if line["scope"] == "central"][-1] == final
