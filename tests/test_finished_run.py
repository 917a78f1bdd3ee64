"""Every way ``fedtune evaluate``, ``export`` and ``predict`` refuse a run they cannot load, in one table: the
input, exit code 2, the exact one-line message, and nothing written (to the run, or an export's directory).

The three commands share one loader (fedtune/finished_run.py), so they refuse alike; only how each is told
where the base model lies differs (``model.path=...`` for evaluate, ``--model-path`` for the others).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from fedtune import cli, model_fingerprint


def _arguments(command: str, run: Path, model_path: Path | None, out: Path) -> list[str]:
    """The command line of ``command`` on ``run``, with this machine's copy of the base model if given."""
    if command == "evaluate":
        return ["evaluate", str(run), *([f"model.path={model_path}"] if model_path else [])]
    model = ["--model-path", str(model_path)] if model_path else []
    if command == "export":
        return ["export", str(run), "--merged", str(out), *model]
    return ["predict", str(run), "fever", *model]


def _setting(command: str) -> str:
    return "model.path=..." if command == "evaluate" else "--model-path"


def _missing_run(run: Path, base: Path, tmp_path: Path) -> tuple[Path, Path | None, Callable[[str], str]]:
    missing = tmp_path / "no-run"
    return missing, None, lambda command: f"{missing} is not a run directory (no config.yaml)."


def _run_without_adapter(run: Path, base: Path, tmp_path: Path) -> tuple[Path, Path | None, Callable[[str], str]]:
    started = tmp_path / "started"  # a run stopped before its first round ended
    started.mkdir()
    shutil.copy(run / "config.yaml", started / "config.yaml")
    return (
        started,
        None,
        lambda command: (
            f"{started} has no adapter yet: no round has finished (no checkpoint in {started / 'checkpoints'})."
        ),
    )


def _other_weights(run: Path, base: Path, tmp_path: Path) -> tuple[Path, Path | None, Callable[[str], str]]:
    other = Path(shutil.copytree(base, tmp_path / "other-weights"))
    weights = load_file(other / "model.safetensors")
    first = sorted(weights)[0]
    save_file({**weights, first: weights[first] + 1e-3}, other / "model.safetensors", metadata={"format": "pt"})
    identity = model_fingerprint.model_identity(str(other))[:23]
    return (
        run,
        other,
        lambda command: (
            f"{run}'s adapter was trained on another base model than the files at model.path={other} ({identity}...), "
            "or by a fedtune version that composes its config differently. "
            f"Set {_setting(command)} to a copy of the run's base model (its model card names the fingerprint)."
        ),
    )


def _no_base_model(run: Path, base: Path, tmp_path: Path) -> tuple[Path, Path | None, Callable[[str], str]]:
    nowhere = tmp_path / "no-model"
    return (
        run,
        nowhere,
        lambda command: (
            f"model.path='{nowhere}' is not a Hugging Face model directory (no config.json). Point it at a local "
            "directory saved with save_pretrained; fedtune never downloads models. A SuperNode whose copy lies "
            f"elsewhere names it in its node config: model-path='/path/to/copy'. Set {_setting(command)} to this "
            "machine's copy of the run's base model."
        ),
    )


@pytest.mark.parametrize("command", ["evaluate", "export", "predict"])
@pytest.mark.parametrize("case", [_missing_run, _run_without_adapter, _other_weights, _no_base_model])
def test_a_run_that_cannot_be_loaded_is_refused_in_one_line(
    command: str,
    case: Callable[[Path, Path, Path], tuple[Path, Path | None, Callable[[str], str]]],
    tiny_run: Path,
    tiny_bert_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run, model_path, message = case(tiny_run, tiny_bert_dir, tmp_path)
    before = sorted(str(p) for p in tiny_run.rglob("*"))
    out = tmp_path / "merged"
    assert cli.main(_arguments(command, run, model_path, out)) == 2
    assert capsys.readouterr().err == f"fedtune: config error: {message(command)}\n"
    assert sorted(str(p) for p in tiny_run.rglob("*")) == before and not out.exists()
