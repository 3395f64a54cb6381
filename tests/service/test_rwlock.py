"""The store's readers-writer lock: shared holders together, an exclusive holder alone, and
a waiting writer is not starved by a stream of readers."""

from __future__ import annotations

import threading
import time

import pytest
from stepd.service.rwlock import RWLock, WouldBlock


def test_readers_share_and_a_writer_waits_for_them() -> None:
    lock = RWLock()
    events: list[str] = []
    with lock.shared(), lock.shared():  # two shared holders at once (same thread is fine)
        writer = threading.Thread(target=lambda: _write(lock, events))
        writer.start()
        time.sleep(0.05)
        assert events == []  # still waiting for the readers
        # a waiting writer holds new readers off
        with pytest.raises(WouldBlock), lock.shared(blocking=False):
            pass
    writer.join(5)
    assert events == ["write"]
    with lock.shared(blocking=False):  # free again
        pass


def _write(lock: RWLock, events: list[str]) -> None:
    with lock.exclusive():
        events.append("write")


def test_exclusive_holder_keeps_everyone_out_and_wakes_them() -> None:
    lock = RWLock()
    got: list[str] = []
    with lock.exclusive():
        with pytest.raises(WouldBlock), lock.shared(blocking=False):
            pass
        readers = [threading.Thread(target=lambda: _read(lock, got)) for _ in range(4)] + [
            threading.Thread(target=lambda: _write(lock, got))
        ]
        for t in readers:
            t.start()
        time.sleep(0.05)
        assert got == []
    for t in readers:
        t.join(5)
        assert not t.is_alive()
    assert sorted(got) == ["read"] * 4 + ["write"]


def _read(lock: RWLock, got: list[str]) -> None:
    with lock.shared():
        got.append("read")


def test_an_exception_inside_releases_the_lock() -> None:
    lock = RWLock()
    with pytest.raises(RuntimeError), lock.shared():
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), lock.exclusive():
        raise RuntimeError("boom")
    with lock.exclusive():  # neither left a holder behind
        pass
