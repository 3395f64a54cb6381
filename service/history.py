"""Bounded histories of sampled statistics (``--history`` samples each, 0: none kept).

A parameter records its norms each time the store measures them (every ``stats_every`` of
its steps); a run records its step rate, lr and overall norms every ``stats_every``
iterations. Each history is a fixed float64 array allocated when its owner is made, so its
bytes are known up front and counted in the budget (:func:`history_bytes`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any

import numpy as np

PARAM_FIELDS = ("version", "step", "time", "grad_norm", "update_norm", "param_norm", "lr")
RUN_FIELDS = ("step", "time", "lr", "steps_per_s", "grad_norm", "update_norm", "param_norm")
INTEGER_FIELDS = frozenset({"version", "step"})


def history_bytes(capacity: int, fields: tuple[str, ...] = PARAM_FIELDS) -> int:
    return capacity * len(fields) * 8


def ratio(update: float | None, param: float | None) -> float | None:
    """Update norm over parameter norm: how far a step moves the parameter, relatively."""
    if update is None or param is None or not param:
        return None
    return update / param


class History:
    """The newest ``capacity`` samples of ``fields``, oldest first when read."""

    def __init__(self, capacity: int, fields: tuple[str, ...]) -> None:
        self.capacity = capacity
        self.fields = fields
        self._data = np.full((capacity, len(fields)), np.nan)
        self._written = 0  # samples ever appended
        self._lock = threading.Lock()  # readers are request threads, writers steps

    @property
    def nbytes(self) -> int:
        return int(self._data.nbytes)

    def append(self, *values: float | None) -> None:
        if not self.capacity:
            return
        row = [math.nan if v is None else v for v in values]
        with self._lock:
            self._data[self._written % self.capacity] = row
            self._written += 1

    def samples(self, after: float | None = None) -> list[dict[str, Any]]:
        """Every kept sample as a dict (missing values None); ``after``: only those whose
        first field (a version or step) is above it, for a poller that has the rest."""
        with self._lock:
            n = min(self._written, self.capacity)
            start = self._written - n
            rows = [self._data[(start + i) % self.capacity].tolist() for i in range(n)]
        if after is not None:
            rows = [r for r in rows if r[0] > after]
        return [self._as_dict(r) for r in rows]

    def _as_dict(self, row: list[float]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in zip(self.fields, row, strict=True):
            if math.isnan(v):
                out[k] = None
            else:
                out[k] = int(v) if k in INTEGER_FIELDS else v
        return out


class StepRate:
    """Iterations per second over the recent iteration ends (0 once they stop coming)."""

    def __init__(self, window: int = 64) -> None:
        self._ends: deque[float] = deque(maxlen=window)

    def tick(self, now: float | None = None) -> None:
        self._ends.append(time.monotonic() if now is None else now)

    def per_second(self, now: float | None = None) -> float:
        ends = list(self._ends)
        if len(ends) < 2:
            return 0.0
        now = time.monotonic() if now is None else now
        span = ends[-1] - ends[0]
        gap = span / (len(ends) - 1)
        if span <= 0 or now - ends[-1] > max(5.0, 3 * gap):  # stopped: no stale rate
            return 0.0
        return (len(ends) - 1) / span
