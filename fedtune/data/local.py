"""A user's own CSV / TSV / JSON / JSONL / Parquet file as a corpus, read offline with ``datasets``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import get_args

import datasets

from fedtune.data.corpus import Corpus, Task
from fedtune.errors import DataError, UnknownLabels

# format -> (datasets packaged builder, extra builder arguments); these builders ship with `datasets`.
_FORMATS: dict[str, tuple[str, dict[str, str]]] = {
    "csv": ("csv", {}),
    "tsv": ("csv", {"delimiter": "\t"}),
    "json": ("json", {}),
    "jsonl": ("json", {}),
    "parquet": ("parquet", {}),
}
_SUFFIXES = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
logger = logging.getLogger(__name__)

_STRING_TYPES = ("string", "large_string")
_TEXT_FORMATS = ("csv", "tsv", "json", "jsonl")
_SNIFF_BYTES = 64 * 1024  # enough to tell a text export from a binary or otherwise-encoded file


def local_file(
    path: str,
    task: Task = "classification",
    format: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    prompt_column: str = "prompt",
    response_column: str = "response",
    label_names: list[str] | None = None,
    drop_incomplete: bool = False,
) -> Corpus:
    """Load a local file as a corpus.

    Args:
        path: The file.
        task: ``"classification"`` (text and label columns), ``"causal_lm"`` (prompt and response) or
            ``"plain_text"`` (one text column: each row is a document, e.g. a note or a report).
        format: One of csv, tsv, json, jsonl, parquet; None infers it from the file suffix.
        text_column: Column holding the text (classification) or the document (plain text).
        label_column: Column holding the label (classification): integer ids or strings.
        prompt_column: Column holding the prompt (causal LM).
        response_column: Column holding the expected response (causal LM).
        label_names: Name of each label id. For integer labels it defaults to ``"0"``, ``"1"``, ...; for
            string labels it fixes the id order (default: the strings sorted alphabetically) and must
            contain every string. For a causal LM whose every response is one of a closed set of answers,
            that set (it must contain every response): evaluation then also ranks them (answer accuracy).
        drop_incomplete: Drop the rows with an empty cell in a mapped column (real exports have missing
            values) and say how many, per column, in the log and the model card; by default such rows are
            refused, since a silently shrunk dataset is worse than an error.

    Returns:
        The corpus with the mapped columns renamed to ``text``/``label``, ``prompt``/``response`` or ``text``;
        other columns (e.g. an organisation id for natural partitioning) are kept.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data file not found: {file} (set data.loader.path to an existing file).")
    kind = _format(file, format)
    builder, options = _FORMATS[kind]
    if file.stat().st_size == 0:
        raise DataError(f"data file is empty: {file}.")
    if kind in _TEXT_FORMATS:
        _check_utf8(file, kind)
    try:
        dataset = datasets.load_dataset(builder, data_files=str(file), split="train", **options)
    except ValueError as error:  # a header without rows: "Instruction 'train' corresponds to no data"
        raise DataError(f"data file has no rows: {file} (only a header, or nothing {kind} can parse).") from error
    except Exception as error:  # noqa: BLE001 - pyarrow's and datasets' parse errors have no common base
        raise DataError(f"{file} could not be read as {kind}: {_one_line(error)}") from error
    if len(dataset) == 0:
        raise DataError(f"data file has no rows: {file}.")

    # canonical column -> (the setting that names it, the file's column)
    mappings = {
        "classification": {"text": ("text_column", text_column), "label": ("label_column", label_column)},
        "causal_lm": {"prompt": ("prompt_column", prompt_column), "response": ("response_column", response_column)},
        "plain_text": {"text": ("text_column", text_column)},
    }
    if task not in mappings:
        raise ValueError(f"data.loader.task must be one of {', '.join(get_args(Task))}, got {task!r}.")
    mapping = mappings[task]
    dataset = _rename(dataset, mapping, file)
    description = f"Local file {file}."
    if drop_incomplete:
        dataset, dropped = _drop_incomplete(dataset, mapping, file)
        description += f" {dropped}" if dropped else ""
    for name in mapping:
        if name != "label":
            _check_strings(dataset, name, mapping[name][1], file)

    if task == "causal_lm":
        answers = _answer_set(dataset, label_names, response_column, file)
        return Corpus(dataset=dataset, task=task, label_names=answers, description=description)
    if task != "classification":
        return Corpus(dataset=dataset, task=task, description=description)
    dataset, names = _encode_labels(dataset, label_column, label_names, file)
    return Corpus(dataset=dataset, task=task, label_names=names, description=description)


def _drop_incomplete(
    dataset: datasets.Dataset, mapping: dict[str, tuple[str, str]], file: Path
) -> tuple[datasets.Dataset, str]:
    """``dataset`` without the rows that have an empty cell in a mapped column, and a sentence saying how many
    were dropped per column (empty when none were)."""
    columns = {name: dataset[name][:] for name in mapping}
    keep = [row for row in range(len(dataset)) if all(values[row] is not None for values in columns.values())]
    if len(keep) == len(dataset):
        return dataset, ""
    if not keep:
        raise DataError(f"every row of {file} has an empty cell in {', '.join(c for _, c in mapping.values())}.")
    empty = {column: sum(v is None for v in columns[name]) for name, (_, column) in mapping.items()}
    counts = ", ".join(f"{n} with an empty {column!r}" for column, n in empty.items() if n)
    sentence = (
        f"{len(dataset) - len(keep)} of {len(dataset)} rows dropped for empty cells ({counts}; "
        "data.loader.drop_incomplete=true)."
    )
    logger.warning("%s: %s", file, sentence)
    return dataset.select(keep), sentence


def _check_utf8(file: Path, kind: str) -> None:
    """Refuse a binary file, or text in another encoding, before a parser fails on it with a cast error."""
    with open(file, "rb") as handle:
        head = handle.read(_SNIFF_BYTES)
    problem = None
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        problem = "it is UTF-16 text (it starts with a UTF-16 byte-order mark)"
    elif b"\0" in head:
        problem = "it holds NUL bytes: a binary file (a spreadsheet, an archive?), not a text export"
    else:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as error:
            cut = len(head) == _SNIFF_BYTES and error.start >= len(head) - 3  # a character cut by the read
            if not cut:
                problem = f"byte {error.start} is not UTF-8 (another encoding, such as Latin-1 or Windows-1252?)"
    if problem is not None:
        raise DataError(
            f"{file} is not UTF-8 {kind} text: {problem}. Export it as UTF-8 {kind}, or as Parquet "
            "(data.loader.format=parquet)."
        )


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _format(file: Path, format: str | None) -> str:
    """The format named, or the one the suffix implies."""
    if format is None:
        format = _SUFFIXES.get(file.suffix.lower())
        if format is None:
            raise DataError(
                f"cannot infer the format of {file} from its suffix {file.suffix!r}; supported suffixes: "
                f"{', '.join(sorted(_SUFFIXES))}; or set data.loader.format to one of {', '.join(_FORMATS)}."
            )
    if format not in _FORMATS:
        raise DataError(f"unknown format {format!r} for {file}; supported formats: {', '.join(_FORMATS)}.")
    return format


def _rename(dataset: datasets.Dataset, mapping: dict[str, tuple[str, str]], file: Path) -> datasets.Dataset:
    """Rename the configured columns to their canonical names, with an error that says which key to set."""
    columns = dataset.column_names
    renames: dict[str, str] = {}
    for canonical, (key, column) in mapping.items():
        if column not in columns:
            raise DataError(
                f"column {column!r} not found in {file}; available columns: {', '.join(columns)}. "
                f"Set data.loader.{key} to the column that holds the {canonical}."
            )
        if column != canonical:
            if canonical in columns:
                raise DataError(
                    f"{file} has a column {canonical!r} and data.loader.{key}={column!r}: renaming {column!r} "
                    f"to {canonical!r} would clash; set data.loader.{key}={canonical!r} or rename a column."
                )
            renames[column] = canonical
    return dataset.rename_columns(renames) if renames else dataset


def _check_strings(dataset: datasets.Dataset, name: str, column: str, file: Path) -> None:
    """Text columns must hold strings, with no missing values."""
    dtype = getattr(dataset.features[name], "dtype", None)
    if dtype not in _STRING_TYPES:
        raise DataError(f"column {column!r} in {file} must hold text, found {dtype or dataset.features[name]}.")
    _refuse_empty_cells(dataset[name][:], column, file)  # [:]: a list, fast


def _refuse_empty_cells(values: list, column: str, file: Path) -> None:
    missing = [row for row, value in enumerate(values) if value is None]
    if missing:
        raise DataError(
            f"column {column!r} in {file} is empty in {len(missing)} of {len(values)} rows (first: data row "
            f"{missing[0] + 1}, counting from 1 after the header); fill or remove those rows, or drop them with "
            "data.loader.drop_incomplete=true."
        )


def _encode_labels(
    dataset: datasets.Dataset, column: str, label_names: list[str] | None, file: Path
) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """Integer label ids and their names; string labels become ids in alphabetical (or given) order."""
    feature = dataset.features["label"]
    values = dataset["label"][:]
    _refuse_empty_cells(values, column, file)
    if isinstance(feature, datasets.ClassLabel):  # Parquet written from a datasets ClassLabel keeps its names
        if label_names is None or list(label_names) == feature.names:
            return dataset, tuple(feature.names)
        index = {name: i for i, name in enumerate(label_names)}  # the given order wins: remap the file's ids by name
        unknown = sorted(set(feature.names[v] for v in values) - index.keys())
        if unknown:
            raise UnknownLabels(unknown, list(label_names), column, str(file))
        ids = [index[feature.names[v]] for v in values]
        return dataset.remove_columns("label").add_column("label", ids), tuple(label_names)
    dtype = getattr(feature, "dtype", None)
    if dtype in _STRING_TYPES:
        names = list(label_names) if label_names is not None else sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted(set(values) - index.keys())
        if unknown:
            raise UnknownLabels(unknown, names, column, str(file))
        ids = [index[value] for value in values]
        return dataset.remove_columns("label").add_column("label", ids), tuple(names)
    if dtype is not None and dtype.startswith("float") and all(float(v).is_integer() for v in values):
        values = [int(v) for v in values]  # integer ids read as floats because the file had empty cells
    elif dtype is None or not dtype.startswith(("int", "uint")):
        raise DataError(
            f"label column {column!r} in {file} must hold integer ids or strings, found {dtype or feature}."
        )
    low, high = min(values), max(values)
    if low < 0:
        raise DataError(f"label column {column!r} in {file} has a negative id {low}; ids start at 0.")
    if label_names is not None and high >= len(label_names):
        raise DataError(
            f"label id {high} in column {column!r} of {file} has no name: data.loader.label_names has "
            f"{len(label_names)} names; add names or leave label_names unset."
        )
    names = list(label_names) if label_names is not None else [str(i) for i in range(high + 1)]
    return dataset.remove_columns("label").add_column("label", values).cast_column(
        "label", datasets.Value("int64")
    ), tuple(names)


def _answer_set(
    dataset: datasets.Dataset, answers: list[str] | None, column: str, file: Path
) -> tuple[str, ...] | None:
    """A causal LM file's declared closed set of answers, once it is checked to hold every response."""
    if answers is None:
        return None
    unknown = sorted({response.strip() for response in dataset["response"]} - {a.strip() for a in answers})
    if unknown:
        raise DataError(
            f"{len(unknown)} distinct responses in column {column!r} of {file} are not in data.loader.label_names "
            f"(the closed set of answers, {len(answers)} given), e.g. {unknown[:3]}; add them, or leave label_names "
            "unset (the run is then scored without answer accuracy)."
        )
    return tuple(answers)
