"""l2_norm and global_grad_clip_scale as in rlx-optim: float64 sums, non-finite skipped."""

from __future__ import annotations

import math

import numpy as np
import pytest
from stepd.kernels import get_backend, global_grad_clip_scale, l2_norm


def test_l2_norm_accumulates_in_float64() -> None:
    # 2^24 + 1 ones: a float32 running sum stops at 2^24, float64 does not.
    x = np.ones((1 << 24) + 1, np.float32)
    assert l2_norm(x) == math.sqrt((1 << 24) + 1)


def test_l2_norm_skips_non_finite_entries() -> None:
    x = np.array([3.0, np.nan, 4.0, np.inf, -np.inf], np.float32)
    assert l2_norm(x) == 5.0
    assert l2_norm(np.zeros(0, np.float32)) == 0.0


def test_clip_scale_brings_the_joint_norm_to_max_norm() -> None:
    grads = [np.full(4, 3.0, np.float32), np.full((2, 2), 4.0, np.float32)]  # norm 10
    scale = global_grad_clip_scale(grads, max_norm=2.5)
    assert scale == pytest.approx(0.25)
    assert math.sqrt(sum(l2_norm(g * scale) ** 2 for g in grads)) == pytest.approx(2.5)


def test_clip_scale_is_one_within_bounds_or_for_zero_grads() -> None:
    assert global_grad_clip_scale([np.ones(4, np.float32)], max_norm=2.0) == 1.0  # norm == 2
    assert global_grad_clip_scale([np.zeros(4, np.float32)], max_norm=0.0) == 1.0
    assert global_grad_clip_scale([], max_norm=1.0) == 1.0


def test_clip_scale_ignores_non_finite_entries() -> None:
    g = np.array([np.nan, 30.0, 40.0, np.inf], np.float32)
    assert global_grad_clip_scale([g], max_norm=5.0) == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_clip_scale_rejects_bad_max_norm(bad: float) -> None:
    with pytest.raises(ValueError, match="Invalid max_norm value"):
        global_grad_clip_scale([np.ones(2, np.float32)], max_norm=bad)


@pytest.mark.parametrize("n", [0, 1, 17, 1 << 15, (1 << 16) + 3, 3 * (1 << 16) + 1])
def test_the_cpu_sums_of_squares_are_float64_sums_of_the_finite_entries(n) -> None:
    """What a CPU store measures its norms with (threaded, in parts): against an exactly
    rounded sum (math.fsum) of the float64 squares, which are exact for float32 values."""
    backend = get_backend("cpu")
    rng = np.random.default_rng(n)
    a = (rng.standard_normal(n) * 100).astype(np.float32)
    b = a + rng.standard_normal(n).astype(np.float32)
    if n > 20:
        a[[3, n // 2]] = [np.nan, np.inf]
        b[[7, n - 1]] = [-np.inf, np.nan]

    def exact(x: np.ndarray) -> float:
        finite = x[np.isfinite(x)].astype(np.float64)
        return math.fsum(finite * finite)

    assert backend.sum_sq(a) == pytest.approx(exact(a), rel=1e-12, abs=0.0)
    # the difference is taken in float32, as the store's old code (param - copy) did
    assert backend.sum_sq(a, b) == pytest.approx(exact(a - b), rel=1e-12, abs=0.0)
    copy = np.full_like(a, 7.0)
    backend.copy_into(copy, a)
    assert copy.tobytes() == a.tobytes()


def test_the_cpu_sum_of_squares_accumulates_in_float64_and_checks_sizes() -> None:
    backend = get_backend("cpu")
    assert backend.sum_sq(np.ones((1 << 24) + 1, np.float32)) == (1 << 24) + 1
    with pytest.raises(ValueError, match="sizes differ"):
        backend.sum_sq(np.ones(4, np.float32), np.ones(5, np.float32))
    with pytest.raises(ValueError, match="sizes differ"):
        backend.copy_into(np.ones(4, np.float32), np.ones(5, np.float32))
