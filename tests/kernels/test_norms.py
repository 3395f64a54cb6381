"""l2_norm and global_grad_clip_scale as in rlx-optim: float64 sums, non-finite skipped."""

from __future__ import annotations

import math

import numpy as np
import pytest
from stepd.kernels import global_grad_clip_scale, l2_norm


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
