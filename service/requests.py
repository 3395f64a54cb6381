"""Completed step requests, remembered by id, so a retried delivery is never applied twice.

A client sends ``X-Stepd-Request-Id`` with every step and, after a transport failure, resends
the same request with the same id. :class:`RequestLog` keeps the last ``capacity`` ids (oldest
forgotten first); the store checks and records an id under the same per-parameter locks as
the step itself, so two deliveries of one id — even concurrent ones — apply once, and the
repeat answers with what was recorded for the original.

Ids must be unique across a run's clients (the log is the run's): the client uses 128 random bits
plus a counter. The memory is bounded: an id retried after ``capacity`` newer requests, or
after a server restart, is applied again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

CAPACITY = 4096


class RequestLog:
    """A thread-safe, bounded map of request id -> what the request did (LRU by insertion)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._lock = threading.Lock()
        self._done: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any | None:
        with self._lock:
            return self._done.get(key)

    def put(self, key: Hashable, record: Any) -> None:
        with self._lock:
            self._done[key] = record
            self._done.move_to_end(key)
            while len(self._done) > self.capacity:
                self._done.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._done)
