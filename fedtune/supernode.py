"""``fedtune supernode``: Flower's own SuperNode, run in this process with shorter waits.

Fixed waits in flwr 1.41's node-side code, not its work, made most of a deployed round (README, "Flower apps
and deployment"; ``benchmarks/deployment_tax.py``):
- A SuperNode asks the SuperLink for a message, and when none is waiting it sleeps 3 s before it asks again
  (``supernode/start_client_internal.py``; no flag changes it); after handing a message to its ClientApp it
  checks for the reply every 0.5 s. The server sends a round's next step only once every node has answered
  the step before, so each node is idle when that step arrives, and the step waits up to 3.5 s on every
  node's poll.
- A message travels as a tree of objects, and the receiver may ask for one before the sender has put it in
  place (the SuperNode creates the task before it has pulled the message's objects, so the worker is always
  early). An object that is not there yet is asked for again after 1 s, then 2 s, 4 s...

This command runs Flower's unchanged SuperNode (same flags, same code) with its polls capped at
``--idle-poll`` seconds and its object pulls retried after 20 ms (doubling up to 0.1 s); ``fedtune worker``
retries its pulls the same way (:func:`retry_object_pulls_sooner`). The cost is more requests: a node asks
the SuperLink up to 1/idle-poll times a second while it waits for the next step.

It reaches into Flower's internals (the loop's module-level ``time``), hence the pinned ``flwr==1.41.0``: it
refuses to start on any other Flower version, or on a loop that no longer sleeps where it expects, so an
upgrade fails loudly instead of silently polling at Flower's pace. tests/test_deployment.py runs it end to end.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from types import ModuleType

FLOWER_VERSION = "1.41.0"  # the release whose SuperNode loop this module has read
# The idle poll, the reply wait and the object pull in that loop
_EXPECTED_CALLS = ("time.sleep(3)", "time.sleep(0.5)", "pull_objects(")
OBJECT_RETRY_SECONDS, OBJECT_RETRY_CAP_SECONDS = 0.02, 0.1  # Flower's own: 1 s and 10 s
DEFAULT_IDLE_POLL = 0.25  # up to four asks a second per waiting node: light on a SuperLink of tens of nodes
MAX_IDLE_POLL = 3.0  # Flower's own idle wait: a longer one would only slow the node down


class _CappedSleeps:
    """Stands in for the ``time`` module inside Flower's SuperNode loop: every sleep lasts at most ``cap`` s."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def shorten_polls(loop: ModuleType, idle_poll: float, flower_version: str) -> None:
    """Cap the sleeps of Flower's SuperNode loop module ``loop`` at ``idle_poll`` seconds, and retry its object
    pulls sooner.

    Raises:
        ValueError: ``idle_poll`` is not in (0, 3].
        RuntimeError: Flower is not the version this was written for, or its loop no longer sleeps as expected.
    """
    if not 0 < idle_poll <= MAX_IDLE_POLL:
        raise ValueError(f"--idle-poll {idle_poll}: seconds in (0, {MAX_IDLE_POLL:g}]")
    source = inspect.getsource(loop)
    missing = [call for call in _EXPECTED_CALLS if call not in source]
    if flower_version != FLOWER_VERSION or missing:
        raise RuntimeError(
            f"fedtune supernode shortens the polls of flwr {FLOWER_VERSION}'s SuperNode; this is flwr "
            f"{flower_version}{' and its loop has no ' + ', '.join(missing) if missing else ''}. Start "
            "flower-supernode with the same flags instead (rounds wait up to 3.5 s a message longer), or install "
            f"flwr=={FLOWER_VERSION}."
        )
    loop.time = _CappedSleeps(idle_poll)  # type: ignore[attr-defined]
    retry_object_pulls_sooner(loop, "pull_objects")


def retry_object_pulls_sooner(module: ModuleType, function: str) -> None:
    """Make ``module``'s calls of Flower's object-pull helper ``function`` (``pull_objects`` or
    ``pull_and_inflate_object_from_tree``) ask again for an object that is not there yet after 20 ms, doubling up
    to 0.1 s, instead of after 1 s, doubling up to 10 s. The total time a pull may take is Flower's."""
    pull = getattr(module, function)
    retry = {"initial_backoff": OBJECT_RETRY_SECONDS, "backoff_cap": OBJECT_RETRY_CAP_SECONDS}
    setattr(module, function, functools.partial(pull, **retry))


def prepare(idle_poll: float) -> None:
    """Cap the polls of Flower's SuperNode in this process at ``idle_poll`` seconds, before :func:`start`.
    Raises as :func:`shorten_polls` does."""
    from flwr.supercore.version import package_version
    from flwr.supernode import start_client_internal

    shorten_polls(start_client_internal, idle_poll, package_version)


def start(flower_args: list[str]) -> None:
    """Run Flower's SuperNode with ``flower_args`` (``flower-supernode``'s own flags) until it exits."""
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]  # Flower's entry point parses sys.argv
    flower_supernode()
