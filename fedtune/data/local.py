"""A user's own CSV / TSV / JSON / JSONL / Parquet file as a corpus, read offline with ``datasets``."""

from __future__ import annotations

from pathlib import Path

import datasets

from fedtune.data.corpus import Corpus, Task

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
_STRING_TYPES = ("string", "large_string")


def local_file(
    path: str,
    task: Task = "classification",
    format: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    prompt_column: str = "prompt",
    response_column: str = "response",
    label_names: list[str] | None = None,
) -> Corpus:
    """Load a local file as a corpus.

    Args:
        path: The file.
        task: ``"classification"`` (text and label columns) or ``"causal_lm"`` (prompt and response).
        format: One of csv, tsv, json, jsonl, parquet; None infers it from the file suffix.
        text_column: Column holding the text (classification).
        label_column: Column holding the label (classification): integer ids or strings.
        prompt_column: Column holding the prompt (causal LM).
        response_column: Column holding the expected response (causal LM).
        label_names: Name of each label id. For integer labels it defaults to ``"0"``, ``"1"``, ...; for
            string labels it fixes the id order (default: the strings sorted alphabetically) and must
            contain every string.

    Returns:
        The corpus with the mapped columns renamed to ``text``/``label`` or ``prompt``/``response``;
        other columns (e.g. an organisation id for natural partitioning) are kept.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data file not found: {file} (set data.loader.path to an existing file).")
    builder, options = _FORMATS[_format(file, format)]
    if file.stat().st_size == 0:
        raise ValueError(f"data file is empty: {file}.")
    try:
        dataset = datasets.load_dataset(builder, data_files=str(file), split="train", **options)
    except ValueError as error:  # a header without rows: "Instruction 'train' corresponds to no data"
        raise ValueError(f"data file has no rows: {file} ({error}).") from error
    if len(dataset) == 0:
        raise ValueError(f"data file has no rows: {file}.")

    if task == "classification":
        mapping = {"text": ("text_column", text_column), "label": ("label_column", label_column)}
    elif task == "causal_lm":
        mapping = {"prompt": ("prompt_column", prompt_column), "response": ("response_column", response_column)}
    else:
        raise ValueError(f"task must be 'classification' or 'causal_lm', got {task!r}.")
    dataset = _rename(dataset, mapping, file)
    for name in mapping:
        if name != "label":
            _check_strings(dataset, name, mapping[name][1], file)

    if task == "causal_lm":
        return Corpus(dataset=dataset, task=task, description=f"Local file {file}.")
    dataset, names = _encode_labels(dataset, label_column, label_names, file)
    return Corpus(dataset=dataset, task=task, label_names=names, description=f"Local file {file}.")


def _format(file: Path, format: str | None) -> str:
    """The format named, or the one the suffix implies."""
    if format is None:
        format = _SUFFIXES.get(file.suffix.lower())
        if format is None:
            raise ValueError(
                f"cannot infer the format of {file} from its suffix {file.suffix!r}; supported suffixes: "
                f"{', '.join(sorted(_SUFFIXES))}; or set data.loader.format to one of {', '.join(_FORMATS)}."
            )
    if format not in _FORMATS:
        raise ValueError(f"unknown format {format!r} for {file}; supported formats: {', '.join(_FORMATS)}.")
    return format


def _rename(dataset: datasets.Dataset, mapping: dict[str, tuple[str, str]], file: Path) -> datasets.Dataset:
    """Rename the configured columns to their canonical names, with an error that says which key to set."""
    columns = dataset.column_names
    renames: dict[str, str] = {}
    for canonical, (key, column) in mapping.items():
        if column not in columns:
            raise ValueError(
                f"column {column!r} not found in {file}; available columns: {', '.join(columns)}. "
                f"Set data.loader.{key} to the column that holds the {canonical}."
            )
        if column != canonical:
            if canonical in columns:
                raise ValueError(
                    f"{file} has a column {canonical!r} and data.loader.{key}={column!r}: renaming {column!r} "
                    f"to {canonical!r} would clash; set data.loader.{key}={canonical!r} or rename a column."
                )
            renames[column] = canonical
    return dataset.rename_columns(renames) if renames else dataset


def _check_strings(dataset: datasets.Dataset, name: str, column: str, file: Path) -> None:
    """Text columns must hold strings, with no missing values."""
    dtype = getattr(dataset.features[name], "dtype", None)
    if dtype not in _STRING_TYPES:
        raise ValueError(f"column {column!r} in {file} must hold text, found {dtype or dataset.features[name]}.")
    missing = [row for row, value in enumerate(dataset[name][:]) if value is None]  # [:]: a list, fast
    if missing:
        raise ValueError(f"column {column!r} in {file} is empty in {len(missing)} rows (first: row {missing[0]}).")


def _encode_labels(
    dataset: datasets.Dataset, column: str, label_names: list[str] | None, file: Path
) -> tuple[datasets.Dataset, tuple[str, ...]]:
    """Integer label ids and their names; string labels become ids in alphabetical (or given) order."""
    feature = dataset.features["label"]
    values = dataset["label"][:]
    if None in values:
        raise ValueError(f"label column {column!r} in {file} is empty in row {values.index(None)}.")
    if isinstance(feature, datasets.ClassLabel):  # Parquet written from a datasets ClassLabel keeps its names
        return dataset, tuple(label_names or feature.names)
    dtype = getattr(feature, "dtype", None)
    if dtype in _STRING_TYPES:
        names = list(label_names) if label_names is not None else sorted(set(values))
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted(set(values) - index.keys())
        if unknown:
            raise ValueError(
                f"labels {unknown[:5]} in column {column!r} of {file} are not in data.loader.label_names "
                f"{names}; add them or leave label_names unset to use all labels in alphabetical order."
            )
        ids = [index[value] for value in values]
        return dataset.remove_columns("label").add_column("label", ids), tuple(names)
    if dtype is None or not dtype.startswith(("int", "uint")):
        raise ValueError(
            f"label column {column!r} in {file} must hold integer ids or strings, found {dtype or feature}."
        )
    low, high = min(values), max(values)
    if low < 0:
        raise ValueError(f"label column {column!r} in {file} has a negative id {low}; ids start at 0.")
    if label_names is not None and high >= len(label_names):
        raise ValueError(
            f"label id {high} in column {column!r} of {file} has no name: data.loader.label_names has "
            f"{len(label_names)} names; add names or leave label_names unset."
        )
    names = list(label_names) if label_names is not None else [str(i) for i in range(high + 1)]
    return dataset.cast_column("label", datasets.Value("int64")), tuple(names)
