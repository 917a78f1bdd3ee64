"""Errors that the ``fedtune`` command reports as one line each, with the setting that fixes them."""

from __future__ import annotations


class DataError(ValueError):
    """A data file that cannot be used as configured: the message names the file, the row or column, and the
    setting (or the edit to the file) that fixes it."""


class UnknownLabels(DataError):
    """A file's labels that are not among the class names its reader was given.

    Args:
        unknown: The labels not among ``names`` (sorted).
        names: The class names given.
        column: The label column.
        file: The file.
    """

    def __init__(self, unknown: list[str], names: list[str], column: str, file: str) -> None:
        self.unknown, self.names, self.column, self.file = unknown, names, column, file
        super().__init__(
            f"labels {unknown[:5]} in column {column!r} of {file} are not in data.loader.label_names "
            f"({len(names)} names: {names[:5]}{' ...' if len(names) > 5 else ''}); add them or leave label_names "
            "unset to use all labels in alphabetical order."
        )
