"""Errors that the ``fedtune`` command reports as one line each, with the setting that fixes them."""

from __future__ import annotations


class DataError(ValueError):
    """A data file that cannot be used as configured: the message names the file, the row or column, and the
    setting (or the edit to the file) that fixes it."""
