"""A node's own settings: its copy of the base model at any path (node config ``model-path``, the same files as
the server's) and the device it trains on (node config ``device``).

The experiment hash holds the model directory's fingerprint (fedtune/model_fingerprint.py), not its path, and
not the device: a copy elsewhere composes the same experiment, and a node with other weights is refused at
connect, named in the server's log, while the run goes on without it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedtune import cli, config, model_fingerprint
from fedtune.channel import RoundFailedError
from fedtune.run_dir import RunDir
from fedtune.server_app import run_federation
from tests.conftest import tiny_overrides
from tests.nodes import InProcessGrid, make_nodes


def _copy(model_dir: Path, target: Path) -> Path:
    shutil.copytree(model_dir, target)
    return target


def _other_weights(model_dir: Path, target: Path) -> Path:
    """A copy of ``model_dir`` with one weight changed by 1e-3: another base model of the same shape."""
    _copy(model_dir, target)
    weights = load_file(target / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "round-0002.pt", weights_only=True)["adapter"]


def test_the_experiment_hash_follows_the_model_files_not_their_path(tiny_bert_dir: Path, tmp_path: Path) -> None:
    def hashed(model_dir: Path) -> str:
        return config.experiment_hash(config.compose(tiny_overrides(model_dir, tmp_path / "run")))

    copy = _copy(tiny_bert_dir, tmp_path / "elsewhere" / "copy")
    assert hashed(copy) == hashed(tiny_bert_dir)
    assert hashed(_other_weights(tiny_bert_dir, tmp_path / "other")) != hashed(tiny_bert_dir)
    (copy / "README.md").write_text("notes\n")  # not a model file
    assert hashed(copy) == hashed(tiny_bert_dir)
    tokenizer = copy / "tokenizer_config.json"  # the tokenizer is part of the model
    settings = json.loads(tokenizer.read_text())
    tokenizer.write_text(json.dumps({**settings, "do_lower_case": not settings["do_lower_case"]}))
    assert hashed(copy) != hashed(tiny_bert_dir)


def test_a_file_changed_in_place_is_hashed_again(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """The digests kept on disk are keyed by size and modification time: an edit that keeps the size is seen."""
    copy = _copy(tiny_bert_dir, tmp_path / "copy")
    before = model_fingerprint.fingerprint(copy)
    config_file = copy / "config.json"
    text = config_file.read_text()
    config_file.write_text(text.replace('"hidden_act": "gelu"', '"hidden_act": "relu"'))
    assert len(config_file.read_text()) == len(text) and config_file.read_text() != text
    assert model_fingerprint.fingerprint(copy) != before
    config_file.write_text(text)
    assert model_fingerprint.fingerprint(copy) == before


def test_nodes_with_their_own_model_paths_and_devices(
    tiny_bert_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Deployed nodes: one reads a copy of the server's model at its own path and another trains on the device
    it names, and both train exactly what they would with the run's settings (the result equals a run where
    every node reads the server's path on the run's device); a node with other weights, and one naming a GPU its
    machine lacks, are each refused at connect with the reason in the server's log, the run going on without
    them."""

    def run(root: Path, own: dict[str, dict[str, str]]) -> Path:
        overrides = tiny_overrides(tiny_bert_dir, root / "run", "federation.num_clients=3")
        nodes = make_nodes(root, overrides, 3, simulated=False, prefix="partition")
        for node in nodes:
            node.context.node_config.update(own.get(node.name, {}))
        experiment = config.load_experiment(config.to_run_config(overrides, str(root / "run")))
        run_federation(InProcessGrid(nodes), experiment)
        return root / "run"

    def refused_once(run_dir: Path, records: list[logging.LogRecord], *reasons: str) -> None:
        refusals = [r.getMessage() for r in records if "failed the query message" in r.getMessage()]
        assert len(refusals) == 1 and all(reason in refusals[0] for reason in reasons), refusals
        clients = [m for m in RunDir(run_dir).read_metrics() if m["scope"] == "train" and m["metric"] == "clients"]
        assert [m["value"] for m in clients] == [2.0, 2.0]

    reference = run(tmp_path / "same-path", {})
    copy = _copy(tiny_bert_dir, tmp_path / "site-b" / "model")
    own = run(tmp_path / "own", {"partition-1": {"model-path": str(copy)}, "partition-2": {"device": "cpu"}})
    expected, trained = _final_adapter(reference), _final_adapter(own)
    assert expected.keys() == trained.keys() and all(torch.equal(expected[k], trained[k]) for k in expected)

    with caplog.at_level(logging.WARNING, logger="fedtune"):
        other_weights = _other_weights(tiny_bert_dir, tmp_path / "site-c" / "model")
        other = run(tmp_path / "other", {"partition-2": {"model-path": str(other_weights)}})
    refused_once(other, caplog.records, "Node partition-2: its base model", "is not the server's", "model-path=")
    assert not [m for m in RunDir(other).read_metrics() if m["scope"] == "client:partition-2"]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedtune"):  # a GPU index no test machine has
        missing_gpu = run(tmp_path / "missing-gpu", {"partition-0": {"device": "cuda:99"}})
    refused_once(
        missing_gpu, caplog.records, "Node partition-0 cannot train where its node config says (device=cuda:99)"
    )


def test_the_device_is_not_part_of_the_experiment(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """Where a node trains is its own choice: the hash a node checks (and pins) is the same on any device."""
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run")
    hashes = {config.experiment_hash(config.compose([*overrides, f"train.device={d}"])) for d in ("auto", "cpu")}
    assert len(hashes) == 1
    run_config = config.to_run_config(overrides, str(tmp_path / "run"))
    assert config.load_experiment(run_config, device="cuda:1").train.device == "cuda:1"
    with pytest.raises(config.ConfigError, match="node config device=.cuda'1.: a value without quotes"):
        config.load_experiment(run_config, device="cuda'1")


def test_every_file_but_readmes_and_hidden_ones_counts(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """A chat template (transformers saves it as chat_template.jinja) or a file in a subfolder changes what
    the model computes; READMEs, licences and hidden files do not."""
    copy = _copy(tiny_bert_dir, tmp_path / "copy")
    before = model_fingerprint.fingerprint(copy)
    for ignored in ("README.md", "LICENSE", ".gitattributes", ".cache/huggingface/download.lock"):
        (copy / ignored).parent.mkdir(parents=True, exist_ok=True)
        (copy / ignored).write_text("x")
    assert model_fingerprint.fingerprint(copy) == before
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    with_template = model_fingerprint.fingerprint(copy)
    assert with_template != before
    (copy / "additional_chat_templates").mkdir()
    (copy / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    assert model_fingerprint.fingerprint(copy) not in (before, with_template)


def test_a_node_that_pins_the_experiment_refuses_any_other(
    tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Node config experiment-hash (printed by `fedtune run OVERRIDES --hash`): the pinned experiment runs; the
    same training with a setting changed that does not change any update (so a second round-1 upload of the same
    updates over other clients) is refused by every node, and the run cannot start."""
    overrides = tiny_overrides(tiny_bert_dir, tmp_path / "run", "federation.num_rounds=1")
    pinned = config.experiment_hash(config.compose(overrides))

    def run(root: Path, changed: list[str]) -> None:
        moved = [*overrides, *changed, f"run_dir={root / 'run'}"]
        nodes = make_nodes(root, moved, 2, simulated=False, prefix="partition", node_config={"experiment-hash": pinned})
        run_federation(InProcessGrid(nodes), config.load_experiment(config.to_run_config(moved, str(root / "run"))))

    run(tmp_path / "pinned", [])
    assert (tmp_path / "pinned" / "run" / "checkpoints" / "round-0001.pt").is_file()
    with caplog.at_level(logging.WARNING, logger="fedtune"), pytest.raises(RoundFailedError, match="0 nodes"):
        run(tmp_path / "other", ["train.eval_max_examples=40"])
    refusals = [r.getMessage() for r in caplog.records if "takes part only in the experiment" in r.getMessage()]
    assert len(refusals) == 2, refusals
    capsys.readouterr()  # the runs' log lines (the fedtune logger prints to stdout once the CLI configured it)
    assert cli.main(["run", *overrides, "--hash"]) == 0  # what an operator publishes and a site pins
    assert capsys.readouterr().out.strip() == pinned
