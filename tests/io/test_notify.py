"""systemd's readiness protocol (``notify.py``), against a real AF_UNIX datagram socket standing in
for systemd's: what ``notify`` sends for each form of ``$NOTIFY_SOCKET``, and that a socket it cannot
use is never fatal. The command's READY=1 and STOPPING=1: ``e2e/test_notify_e2e.py``."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from l4proxy.notify import notify

from ..servers import received, systemd_socket


@pytest.mark.parametrize("abstract", [False, True])
def test_a_state_reaches_the_socket(tmp_path: Path, abstract: bool) -> None:
    with systemd_socket(None if abstract else tmp_path / "notify") as (sock, where):
        assert notify("READY=1", {"NOTIFY_SOCKET": where})
        assert received(sock) == b"READY=1"


@pytest.mark.parametrize(("where", "logged"), [
    ("", None),  # not under systemd: nothing to do, nothing said
    ("relative/notify", "expected an absolute path or @name"),
    ("/nonexistent/notify", "cannot send READY=1: No such file or directory"),
])  # fmt: skip
def test_nothing_sent_and_the_proxy_carries_on(
    where: str, logged: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "l4proxy"):
        assert notify("READY=1", {"NOTIFY_SOCKET": where} if where else {}) is False
    messages = [r.getMessage() for r in caplog.records]
    assert [logged in m for m in messages] == ([] if logged is None else [True]), messages


def test_a_full_queue_does_not_block(tmp_path: Path) -> None:
    """systemd not reading: the send fails at once (non-blocking) instead of stalling the loop."""
    with systemd_socket(tmp_path / "notify") as (_sock, where):
        sent = 0
        while notify("WATCHDOG=1", {"NOTIFY_SOCKET": where}):
            sent += 1
            assert sent < 100_000, "the queue never filled"
        assert sent > 0
