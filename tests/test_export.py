"""``fedtune export RUN_DIR --merged OUT``: the final adapter merged into its base model, loaded back with plain
Transformers classes (no PEFT, no fedtune), gives the logits of the run's PEFT model with that adapter.

For a mean-pooling classifier the reference is reached by the very lines the exported model card shows,
read from the card and run as a user would paste them. Float32 throughout: merging adds the adapter's product
into the weights before the matrix products, so the logits agree to rounding (about 1e-7 here; the tests allow
1e-5), not bit for bit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from fedtune import cli
from fedtune.export import HEAD_FILE
from fedtune.finished_run import load_run
from tests.conftest import tiny_overrides
from tests.nodes import federate

TEXTS = ["fever", "a displaced fracture of the left femur after a fall"]  # lengths differ: padding would show


@pytest.fixture(scope="module")
def mean_pooling_run(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-round tiny run whose head reads mean-pooled tokens."""
    root = tmp_path_factory.mktemp("mean-pooling-run")
    return federate(root, tiny_overrides(tiny_bert_dir, root / "run", "model.pooling=mean"), 2, prefix="partition")


def _export(run: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(["export", str(run), "--merged", str(out)]) == 0
    return capsys.readouterr().out


def _reference_logits(run: Path, texts: list[str]) -> torch.Tensor:
    """The run's PEFT model with its final adapter, on ``texts``."""
    finished = load_run(run)
    batch = finished.experiment.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return finished.model()(**batch).logits


def test_a_classifier_becomes_a_plain_sequence_classifier(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    printed = _export(tiny_run, out, capsys)
    assert f"{out}: the final adapter of {tiny_run} (round 2) merged into its base model" in printed
    assert "load it with AutoModelForSequenceClassification" in printed
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits
    assert torch.allclose(logits, _reference_logits(tiny_run, TEXTS), atol=1e-5)
    assert model.config.id2label == dict(enumerate(load_run(tiny_run).label_names))
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: fedtune-tests/tiny-bert\nlibrary_name: transformers\n")
    assert card.endswith((tiny_run / "README.md").read_text())  # then the run's own model card


def test_a_mean_pooling_classifier_gives_its_encoder_its_head_and_the_lines_that_apply_them(
    mean_pooling_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged"
    assert f"load it with AutoModel and {HEAD_FILE} (mean pooling)" in _export(mean_pooling_run, out, capsys)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    snippet = re.search(r"```python\n(import torch\n.*?)```", (out / "README.md").read_text(), re.DOTALL)
    assert snippet is not None
    names: dict = {"model_dir": str(out), "texts": TEXTS}
    exec(snippet.group(1), names)  # the card's lines, as a user would paste them
    assert torch.allclose(names["logits"], _reference_logits(mean_pooling_run, TEXTS), atol=1e-5)
    assert names["labels"] == [load_run(mean_pooling_run).label_names[i] for i in names["logits"].argmax(-1)]
    _, loading = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert loading["missing_keys"]  # a plain classifier would use a pooler and head it does not have


@pytest.mark.parametrize("trained", ["tiny_causal_run", "tiny_plain_text_run"])  # answers prompts; continues text
def test_a_causal_lm_becomes_a_plain_causal_lm(
    trained: str, request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, out = request.getfixturevalue(trained), tmp_path / "merged"
    assert "load it with AutoModelForCausalLM" in _export(run, out, capsys)
    assert "model = AutoModelForCausalLM.from_pretrained(model_dir)" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = AutoTokenizer.from_pretrained(out)(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.allclose(logits, _reference_logits(run, TEXTS), atol=1e-5)


def test_export_writes_only_a_new_directory(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert cli.main(["export", str(tiny_run), "--merged", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"fedtune: config error: {out} exists and is not empty: fedtune export writes a new directory.\n"
    )
    assert [path.name for path in tmp_path.iterdir()] == ["merged"] and [p.name for p in out.iterdir()] == ["mine.txt"]
