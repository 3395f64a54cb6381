"""The one timing loop of the benchmarks: wall-clock seconds per call, after a warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable


def timed(
    fn: Callable[[], object],
    repeat: int,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn`` after ``warmup`` untimed ones;
    ``sync`` (a device synchronisation) runs inside each timed call."""
    for _ in range(warmup):
        fn()
        sync()
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out
