"""Flower's object pulls, retried sooner where fedtune runs Flower's code (its SuperNode, worker and ServerApp).

A Flower message travels as a tree of objects, and a receiver may ask for an object before the sender has put it
in place: the SuperNode offers its worker a task before it has pulled the whole message, and a reply reaches
the SuperLink before its parts. flwr 1.41 asks again for a missing object after 1 s, then 2 s, 4 s... (up to
10 s), which made seconds of a deployed round whose work takes milliseconds (examples/deployment/README.md).
This asks again after 20 ms, doubling up to 0.1 s; the time a pull may take in all is still Flower's.

Flower's internals, hence the pinned ``flwr==1.41.0``; tests/test_deployment.py runs every side end to end.
"""

from __future__ import annotations

import functools
from types import ModuleType

OBJECT_RETRY_SECONDS, OBJECT_RETRY_CAP_SECONDS = 0.02, 0.1  # Flower's own: 1 s and 10 s


def retry_object_pulls_sooner(module: ModuleType, function: str) -> None:
    """Make ``module``'s calls of Flower's object-pull helper ``function`` (``pull_objects`` or
    ``pull_and_inflate_object_from_tree``, as ``module`` imported it) retry with the waits above. Idempotent."""
    pull = getattr(module, function)
    retry = {"initial_backoff": OBJECT_RETRY_SECONDS, "backoff_cap": OBJECT_RETRY_CAP_SECONDS}
    if isinstance(pull, functools.partial) and pull.keywords == retry:
        return
    setattr(module, function, functools.partial(pull, **retry))
