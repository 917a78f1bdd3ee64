"""``fedtune supernode``: Flower's own SuperNode, run in this process with shorter waits.

Fixed waits in flwr 1.41's SuperNode, not its work, made most of a deployed round (examples/deployment/README.md,
``benchmarks/deployment_tax.py``). A SuperNode asks the SuperLink for a message, and when none is waiting it
sleeps 3 s before it asks again (``supernode/start_client_internal.py``; no flag changes it); after handing a
message to its ClientApp it checks for the reply every 0.5 s. The server sends a round's next step only once
every node has answered the step before, so each node is idle when that step arrives, and the step waits up to
3.5 s on every node's poll.

This command runs Flower's unchanged SuperNode (same flags, same code) with those waits capped at
``--idle-poll`` seconds, and its pulls of a message's parts retried sooner (fedtune/flower_waits.py, as
``fedtune worker`` and the ServerApp do). The cost is more requests: a node asks the SuperLink up to
1/idle-poll times a second while it waits for the next step.

It reaches into Flower's internals (the loop's module-level ``time`` and ``pull_objects``), hence the pinned
``flwr==1.41.0``: it refuses to start on any other Flower version, or on a loop that no longer has those waits,
so an upgrade fails loudly instead of silently polling at Flower's pace. tests/test_deployment.py runs it end
to end.
"""

from __future__ import annotations

import inspect
import sys
import time
from types import ModuleType

from fedtune.flower_waits import retry_object_pulls_sooner

FLOWER_VERSION = "1.41.0"  # the release whose SuperNode loop this module has read
# The idle poll, the reply wait and the object pull in that loop
_EXPECTED_CALLS = ("time.sleep(3)", "time.sleep(0.5)", "pull_objects(")
DEFAULT_IDLE_POLL = 0.1  # up to ten small asks a second per waiting node (Flower's simulation polls at 0.1 s too)
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
