"""Bad data files, as a user's first run meets them: one line naming the file, the row or column and the fix.

``fedtune run`` exits with code 2, prints exactly one line (``fedtune: data error: ...``) and no traceback,
and writes nothing: the run directory is not created. ``--debug`` shows the traceback instead. Empty cells
can be dropped instead of refused, counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from fedtune import cli
from fedtune.data import local_file
from fedtune.errors import DataError

ROWS = "note,label\nfever and cough,J\nchest pain,I\nrash,L\nheadache,R\n"
LATIN1 = ROWS.replace("rash", "ecz\u00e9ma").encode("latin-1")
FIRST_NON_UTF8 = LATIN1.index("\u00e9".encode("latin-1"))


def _write(text: str | bytes, name: str = "notes.csv") -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        path = directory / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    return make


CASES = {
    "missing file": (
        lambda directory: directory / "nowhere.csv",
        "data file not found: {path} (set data.loader.path to an existing file).",
    ),
    "wrong column name": (
        _write(ROWS.replace("note,", "body,")),
        "column 'note' not found in {path}; available columns: body, label. Set data.loader.text_column to the "
        "column that holds the text.",
    ),
    "header only": (_write("note,label\n"), "data file has no rows: {path} (only a header, or nothing csv can parse)."),
    "binary file": (
        _write(b"PK\x03\x04\x14\x00\x06\x00" + bytes(range(256)) * 4),
        "{path} is not UTF-8 csv text: it holds NUL bytes: a binary file (a spreadsheet, an archive?), not a text "
        "export. Export it as UTF-8 csv, or as Parquet (data.loader.format=parquet).",
    ),
    "another encoding": (
        _write(LATIN1),
        f"{{path}} is not UTF-8 csv text: byte {FIRST_NON_UTF8} is not UTF-8 (another encoding, such as Latin-1 or "
        "Windows-1252?). "
        "Export it as UTF-8 csv, or as Parquet (data.loader.format=parquet).",
    ),
    "UTF-16": (
        _write(ROWS.encode("utf-16")),
        "{path} is not UTF-8 csv text: it is UTF-16 text (it starts with a UTF-16 byte-order mark). Export it as "
        "UTF-8 csv, or as Parquet (data.loader.format=parquet).",
    ),
    "empty label cell": (
        _write(ROWS.replace("chest pain,I", "chest pain,")),
        "column 'label' in {path} is empty in 1 of 4 rows (first: data row 2, counting from 1 after the header); "
        "fill or remove those rows, or drop them with data.loader.drop_incomplete=true.",
    ),
    "one row": (
        _write("note,label\nfever,J\n"),
        "the data has 1 row(s): a run needs at least one test row (data.test_size) and one training row per "
        "client; use a larger file.",
    ),
}


# A causal LM continuing documents (model.task=plain_text; data.loader.task follows it): one text column.
PLAIN_TEXT_CASES = {
    "plain text: wrong column name": (
        _write("body,site\nfever and cough,a\nchest pain,b\n"),
        "column 'note' not found in {path}; available columns: body, site. Set data.loader.text_column to the "
        "column that holds the text.",
    ),
    "plain text: empty document": (
        _write('{"note": "fever and cough"}\n{"note": null}\n{"note": "rash"}\n', "notes.jsonl"),
        "column 'note' in {path} is empty in 1 of 3 rows (first: data row 2, counting from 1 after the header); "
        "fill or remove those rows, or drop them with data.loader.drop_incomplete=true.",
    ),
    "plain text: numbers, not text": (
        _write("note\n1\n2\n3\n"),
        "column 'note' in {path} must hold text, found int64.",
    ),
}


def _overrides(model_dir: Path, path: Path, run_dir: Path) -> list[str]:
    return [
        "model=local",
        f"model.path={model_dir}",
        "data=local",
        f"data.loader.path={path}",
        "data.loader.text_column=note",
        "data.test_size=1",
        f"run_dir={run_dir}",
    ]


@pytest.mark.parametrize("case", [*CASES, *PLAIN_TEXT_CASES])
def test_a_bad_data_file_gets_one_line_and_writes_nothing(
    case: str, tiny_bert_dir: Path, tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, message = CASES[case] if case in CASES else PLAIN_TEXT_CASES[case]
    path = make(tmp_path)
    if case in CASES:
        overrides = _overrides(tiny_bert_dir, path, tmp_path / "run")
    else:
        overrides = [*_overrides(tiny_llama_dir, path, tmp_path / "run"), "model.task=plain_text"]
    assert cli.main(["run", *overrides]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"fedtune: data error: {message.format(path=path)}"]
    assert "Traceback" not in captured.out + captured.err
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tiny_bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found") as raised:
        cli.main(["--debug", "run", *_overrides(tiny_bert_dir, tmp_path / "nowhere.csv", tmp_path / "run")])
    assert raised.value.__suppress_context__  # Hydra's wrapper is not shown a second time


def test_empty_cells_can_be_dropped_and_are_counted(
    tiny_bert_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """``data.loader.drop_incomplete=true``: the rows with an empty text or label cell go, counted per column in
    the log and the model card's data paragraph; the others stay, in order."""
    rows = [f"note {i},{'IJLR'[i % 4]}" for i in range(12)]
    rows[3], rows[7], rows[8] = ",J", ",I", "note 8,"
    path = tmp_path / "notes.csv"
    path.write_text("note,label\n" + "\n".join(rows) + "\n")
    corpus = local_file(str(path), text_column="note", drop_incomplete=True)
    assert corpus.dataset["text"] == [f"note {i}" for i in range(12) if i not in (3, 7, 8)]
    expected = "3 of 12 rows dropped for empty cells (2 with an empty 'note', 1 with an empty 'label'"
    assert expected in corpus.description
    overrides = [*_overrides(tiny_bert_dir, path, tmp_path / "run"), "data.loader.drop_incomplete=true"]
    with caplog.at_level(logging.WARNING, logger="fedtune"):
        assert cli.main(["run", *overrides, "partition=iid", "federation.num_clients=2", "--partitions"]) == 0
    assert any(expected in record.getMessage() for record in caplog.records)
    assert "client" in capsys.readouterr().out  # the partition summary printed as usual


def test_integer_labels_with_empty_cells_are_ids_once_those_rows_are_dropped(tmp_path: Path) -> None:
    """An integer label column with an empty cell is read as floats; dropped rows leave integer ids."""
    path = tmp_path / "notes.csv"
    path.write_text("text,label\nfever,0\nrash,\ncough,2\nache,1\n")
    corpus = local_file(str(path), drop_incomplete=True)
    assert corpus.dataset["label"] == [0, 2, 1] and corpus.label_names == ("0", "1", "2")
    assert corpus.dataset.features["label"].dtype == "int64"
