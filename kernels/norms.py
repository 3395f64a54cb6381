"""Gradient norms as in rlx-optim: float64 accumulation, non-finite entries skipped."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

_CHUNK = 1 << 20  # bounds the float64 temporary to 8 MiB


def _sum_sq(x: np.ndarray) -> float:
    flat = np.asarray(x).reshape(-1)
    total = 0.0
    for lo in range(0, flat.size, _CHUNK):
        chunk = flat[lo : lo + _CHUNK].astype(np.float64)
        if not np.isfinite(chunk).all():
            chunk = chunk[np.isfinite(chunk)]
        total += float(np.dot(chunk, chunk))
    return total


def l2_norm(x: np.ndarray) -> float:
    """‖x‖₂ over the finite entries of ``x``, accumulated in float64."""
    return math.sqrt(_sum_sq(x))


def global_grad_clip_scale(grads: Iterable[np.ndarray], max_norm: float) -> float:
    """Factor (≤ 1) to multiply every gradient by so their joint L2 norm is ≤ ``max_norm``.

    Returns 1.0 when the norm is already within bounds (or zero); non-finite entries are
    ignored when measuring, as in rlx-optim.
    """
    if not (math.isfinite(max_norm) and max_norm >= 0.0):
        raise ValueError(f"Invalid max_norm value: {max_norm}")
    norm_sq = sum(_sum_sq(g) for g in grads)
    if norm_sq > max_norm * max_norm and norm_sq > 0.0:
        return min(1.0, max_norm / math.sqrt(norm_sq))
    return 1.0
