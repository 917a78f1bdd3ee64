"""``fedtune supernode``: Flower's SuperNode with its polls of the SuperLink capped (fedtune/supernode.py).

The deployment test runs it end to end (TLS, node authentication, `fedtune worker`); these check what it
changes in Flower's loop, and that it refuses to run on a Flower whose loop it has not read.
"""

from __future__ import annotations

import time

import pytest
from flwr.supernode import start_client_internal

from fedtune import cli, seeding, supernode


def test_every_sleep_of_the_supernode_loop_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)  # restored after the test
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    supernode.shorten_polls(start_client_internal, 0.1, supernode.FLOWER_VERSION)
    loop_time = start_client_internal.time
    loop_time.sleep(3)  # the idle poll
    loop_time.sleep(0.5)  # the wait for a reply
    loop_time.sleep(0.05)
    assert slept == [0.1, 0.1, 0.05]
    assert loop_time.monotonic is time.monotonic  # everything else is the time module's own


def test_another_flower_or_another_loop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(start_client_internal, "time", start_client_internal.time)
    with pytest.raises(RuntimeError, match="this is flwr 1.42.0. Start flower-supernode with the same flags"):
        supernode.shorten_polls(start_client_internal, 0.1, "1.42.0")
    with pytest.raises(RuntimeError, match=r"its loop has no time.sleep\(3\), time.sleep\(0.5\)"):
        supernode.shorten_polls(seeding, 0.1, supernode.FLOWER_VERSION)
    assert start_client_internal.time is time  # nothing was changed


@pytest.mark.parametrize("idle_poll", [0, -1, 3.5])
def test_an_idle_poll_outside_flowers_own_is_refused(idle_poll: float, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["supernode", "--idle-poll", str(idle_poll), "--", "--insecure"]) == 2
    assert f"fedtune supernode: --idle-poll {float(idle_poll)}: seconds in (0, 3]" in capsys.readouterr().err
    assert start_client_internal.time is time
