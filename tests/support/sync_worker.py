"""A training worker process for the sync-mode test (importable by spawned processes)."""

from __future__ import annotations

import httpx
import numpy as np


def gradient(worker: str, step: int, shape: tuple[int, ...]) -> np.ndarray:
    seed = int(worker.removeprefix("w")) * 100_003 + step * 7 + len(shape)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run(url: str, worker: str, steps: int, specs: dict[str, tuple[int, ...]]) -> dict:
    """Send this worker's gradients for every parameter, end each iteration; return what the
    server answered last (every worker must see the same bytes)."""
    last = {}
    with httpx.Client(base_url=url, timeout=60) as c:
        for step in range(steps):
            for name, shape in specs.items():
                r = c.post(
                    f"/v1/runs/t/params/{name}/step?worker={worker}",
                    content=gradient(worker, step, shape).tobytes(),
                )
                r.raise_for_status()
                last[name] = r.content
            c.post(f"/v1/runs/t/iteration/end?worker={worker}").raise_for_status()
    return last
