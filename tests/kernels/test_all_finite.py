"""The gradient screen every server step runs: compiled CPU check against NumPy's answer."""

from __future__ import annotations

import numpy as np
import pytest
from stepd.kernels import get_backend

# around the 16-lane unrolling and the single-thread / parallel switch (1 << 15)
SIZES = [0, 1, 15, 16, 17, 1000, (1 << 15) - 1, 1 << 15, (1 << 15) + 3, 1 << 20]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("n", SIZES)
def test_all_finite_agrees_with_numpy(backend, n) -> None:
    b = get_backend(backend)
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32) * 1e30
    assert b.all_finite(x)
    for bad in (np.nan, np.inf, -np.inf):
        for pos in sorted({0, n // 2, n - 1} - {-1}) if n else []:
            y = x.copy()
            y[pos] = bad
            assert not b.all_finite(y), (bad, pos)
            assert bool(np.isfinite(y).all()) is False
    big = np.full(n, np.finfo(np.float32).max, np.float32)  # x - x is 0 even at the top
    assert b.all_finite(big)
