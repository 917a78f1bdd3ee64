"""``fedtune supernode``: Flower's SuperNode with its polls of the SuperLink capped (fedtune/supernode.py).

The deployment test runs it end to end (TLS, node authentication, `fedtune worker`); these check what it
changes in Flower's loop, and that it refuses to run on a Flower whose loop it has not read.
"""

from __future__ import annotations

import functools
import random
import threading
import time
from types import SimpleNamespace

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError
from flwr.supernode import start_client_internal

from fedtune import cli, flower_waits, seeding, supernode


def _restored_after_the_test(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("time", "pull_objects"):
        monkeypatch.setattr(start_client_internal, name, getattr(start_client_internal, name))


def test_every_sleep_of_the_supernode_loop_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    _restored_after_the_test(monkeypatch)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    supernode.shorten_polls(start_client_internal, 0.1, supernode.FLOWER_VERSION)
    loop_time = start_client_internal.time
    loop_time.sleep(3)  # the idle poll
    loop_time.sleep(0.5)  # the wait for a reply
    loop_time.sleep(0.05)
    assert slept == [0.1, 0.1, 0.05]
    assert loop_time.monotonic is time.monotonic  # everything else is the time module's own


def test_a_part_of_a_message_not_there_yet_is_asked_for_again_within_20_ms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's object pull, with the SuperNode's retry settings, against an object that appears on the third ask:
    it waits 20 ms and then 40 ms (Flower's own: 1 s and 2 s)."""
    _restored_after_the_test(monkeypatch)
    supernode.shorten_polls(start_client_internal, 0.25, supernode.FLOWER_VERSION)
    waits: list[float] = []
    monkeypatch.setattr(random, "uniform", lambda low, high: 0.0)  # Flower's jitter off: the waits are exact
    asks = iter([ObjectUnavailableError("a"), ObjectUnavailableError("a"), b"content"])

    def pull_object(object_id: str) -> bytes:
        answer = next(asks)
        if isinstance(answer, Exception):
            raise answer
        return answer

    class Recorded(threading.Event):  # the pull waits on its stop event between asks
        def wait(self, timeout: float | None = None) -> bool:
            waits.append(float("nan") if timeout is None else timeout)
            return False

    monkeypatch.setattr(inflatable_utils, "threading", SimpleNamespace(Event=Recorded, Lock=threading.Lock))
    assert start_client_internal.pull_objects(["a"], pull_object_fn=pull_object) == {"a": b"content"}
    assert waits == pytest.approx([0.02, 0.04])


def test_another_flower_or_another_loop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _restored_after_the_test(monkeypatch)
    with pytest.raises(RuntimeError, match="this is flwr 1.42.0. Start flower-supernode with the same flags"):
        supernode.shorten_polls(start_client_internal, 0.1, "1.42.0")
    with pytest.raises(RuntimeError, match=r"its loop has no time.sleep\(3\), time.sleep\(0.5\), pull_objects\("):
        supernode.shorten_polls(seeding, 0.1, supernode.FLOWER_VERSION)
    assert start_client_internal.time is time  # nothing was changed


@pytest.mark.parametrize("idle_poll", [0, -1, 3.5])
def test_an_idle_poll_outside_flowers_own_is_refused(idle_poll: float, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["supernode", "--idle-poll", str(idle_poll), "--", "--insecure"]) == 2
    assert f"fedtune supernode: --idle-poll {float(idle_poll)}: seconds in (0, 3]" in capsys.readouterr().err
    assert start_client_internal.time is time


def test_the_worker_and_the_serverapp_retry_their_pulls_the_same_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other two processes that pull a message's parts (fedtune/flower_waits.py), applied once however
    often it is asked (a ServerApp process may run several runs' main)."""
    from flwr.superlink.grid import http_grid
    from flwr.supernode.runtime import run_clientapp

    for module, name in ((http_grid, "pull_objects"), (run_clientapp, "pull_and_inflate_object_from_tree")):
        flowers = getattr(module, name)
        flowers = flowers.func if isinstance(flowers, functools.partial) else flowers  # a ServerApp ran earlier
        monkeypatch.setattr(module, name, flowers)
        for _ in range(2):
            flower_waits.retry_object_pulls_sooner(module, name)
        patched = getattr(module, name)
        assert patched.func is flowers and patched.keywords == {"initial_backoff": 0.02, "backoff_cap": 0.1}
