"""A readers-writer lock: steps share the store, iteration ends and checkpoints own it.

Taking it shared is on every step's path, so the shared side is two plain mutex round trips
with no generator-based context manager and no notification unless a writer waits.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class WouldBlock(Exception):
    """A non-blocking acquisition found the lock taken."""


class _Shared:
    __slots__ = ("_blocking", "_lock")

    def __init__(self, lock: RWLock, blocking: bool) -> None:
        self._lock = lock
        self._blocking = blocking

    def __enter__(self) -> None:
        self._lock.acquire_shared(self._blocking)

    def __exit__(self, *exc: object) -> None:
        self._lock.release_shared()


class RWLock:
    """Many shared holders or one exclusive holder; a waiting writer blocks new readers."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._shared = (_Shared(self, False), _Shared(self, True))

    def shared(self, blocking: bool = True) -> _Shared:
        """``with lock.shared():`` (``blocking=False`` raises ``WouldBlock`` instead of
        waiting)."""
        return self._shared[blocking]

    def acquire_shared(self, blocking: bool = True) -> None:
        with self._mutex:
            while self._writer or self._writers_waiting:
                if not blocking:
                    raise WouldBlock
                self._cond.wait()
            self._readers += 1

    def release_shared(self) -> None:
        with self._mutex:
            self._readers -= 1
            if not self._readers and self._writers_waiting:
                self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
