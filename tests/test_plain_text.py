"""A federated run on plain-text documents under DP-SGD, end to end through the real server loop and ClientApp
(in-process nodes): a site's own CSV with one text column, next-token loss on every token, perplexity in
central and federated evaluation (no exact-match check), and the documents cut to ``model.max_length``
counted in the partition summary. The references are computed here from the run's saved config and checkpoint, with the
tokenizer directly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerBase

from fedtune.experiment import Experiment, get_experiment
from fedtune.run_dir import RunDir

MAX_LENGTH = 32  # tests/conftest.py's tiny_overrides
Run = tuple[Path, Experiment]


def _tokens(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Each document's length as trained on: its text and the end-of-sequence token."""
    return [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in texts]


@pytest.fixture(scope="module")
def run(tiny_plain_text_run: Path) -> Run:
    """The run directory and the experiment its saved config composes."""
    return tiny_plain_text_run, get_experiment(OmegaConf.load(tiny_plain_text_run / "config.yaml"))


def test_central_and_federated_perplexity_is_exp_of_the_loss_every_round(run: Run) -> None:
    run_dir, _ = run
    metrics = RunDir(run_dir).read_metrics()
    for scope, rounds in (("central", [0, 1, 2]), ("federated", [1, 2])):
        for server_round in rounds:
            found = {m["metric"]: m["value"] for m in metrics if m["scope"] == scope and m["round"] == server_round}
            assert set(found) == {"loss", "perplexity"}, (scope, server_round)  # no exact match for documents
            assert math.isclose(found["perplexity"], math.exp(found["loss"]), rel_tol=1e-9)
    train = [m["value"] for m in metrics if m["scope"] == "train" and m["metric"] == "train_loss"]
    assert len(train) == 2 and all(math.isfinite(loss) for loss in train)
    epsilon = [m["value"] for m in metrics if m["scope"] == "train" and m["metric"] == "epsilon_max"]
    assert 0 < epsilon[0] < epsilon[1] <= 8.0 * 1.001  # DP-SGD per document, within privacy.target_epsilon


def test_the_federated_loss_is_the_mean_over_every_token_the_clients_evaluated(run: Run) -> None:
    """Each client's validation loss of the final adapter, weighted by its documents' predicted tokens (each
    document's length, cut to max_length, less its first token), counted here with the tokenizer."""
    run_dir, experiment = run
    runs = RunDir(run_dir)
    adapter = RunDir.read_checkpoint(runs.checkpoint_paths()[-1]).adapter
    losses, weights = [], []
    for partition in range(2):
        val = experiment.client_data(partition).val
        losses.append(experiment.evaluate(adapter, val)["loss"])
        weights.append(sum(min(length, MAX_LENGTH) - 1 for length in _tokens(val["text"], experiment.tokenizer)))
    expected = sum(loss * weight for loss, weight in zip(losses, weights, strict=True)) / sum(weights)
    final = {m["metric"]: m["value"] for m in runs.read_metrics() if m["scope"] == "federated" and m["round"] == 2}
    assert final["loss"] == pytest.approx(expected, rel=1e-6)
    by_documents = sum(loss * len(experiment.client_data(p).val) for p, loss in enumerate(losses)) / sum(
        len(experiment.client_data(p).val) for p in range(2)
    )
    assert final["loss"] != pytest.approx(by_documents, rel=1e-6)  # the weighting shows: tokens, not documents


def test_the_summary_counts_the_documents_cut_to_max_length_and_the_card_says_so(run: Run) -> None:
    run_dir, experiment = run
    summary = json.loads((run_dir / "partitions.json").read_text())
    for client in summary["clients"]:
        data = experiment.client_data(int(client["id"].rsplit("-", 1)[1]))
        lengths = _tokens(data.train["text"][:] + data.val["text"][:], experiment.tokenizer)
        assert client["truncated"] == sum(length > MAX_LENGTH for length in lengths) > 0
        assert client["labels"] is None
    card = (run_dir / "README.md").read_text()
    assert (
        f"each row is one document and one record (the unit of DP-SGD's guarantee), read up to its first {MAX_LENGTH}"
        in card
    )
