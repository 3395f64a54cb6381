"""Gradient norms as in rlx-optim: float64 accumulation, non-finite entries skipped.

A CuPy array is reduced where it lives: only the final scalar comes to the host (a norm
sampled every few steps must not copy whole tensors off the device)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

_CHUNK = 1 << 20  # bounds the float64 temporary to 8 MiB


def _device_module(x: object) -> Any:
    """CuPy if ``x`` is a CuPy array (imported only then: it is an optional dependency)."""
    if type(x).__module__.split(".")[0] != "cupy":
        return None
    import cupy

    return cupy


def _sum_sq(x: np.ndarray) -> float:
    xp = _device_module(x)
    if xp is not None:
        return float(_device_sum_sq(xp, x))
    flat = np.asarray(x).reshape(-1)
    total = 0.0
    for lo in range(0, flat.size, _CHUNK):
        chunk = flat[lo : lo + _CHUNK].astype(np.float64)
        if not np.isfinite(chunk).all():
            chunk = chunk[np.isfinite(chunk)]
        total += float(np.dot(chunk, chunk))
    return total


def _device_sum_sq(xp: Any, x: Any) -> Any:
    """The sum of squares of ``x``'s finite entries as a 0-d device array: no host
    synchronisation (non-finite entries are masked, not tested for)."""
    flat = x.reshape(-1)
    total = xp.zeros((), xp.float64)
    for lo in range(0, flat.size, _CHUNK):
        chunk = flat[lo : lo + _CHUNK].astype(xp.float64)
        chunk = xp.where(xp.isfinite(chunk), chunk, 0.0)
        total += xp.dot(chunk, chunk)
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
    norm_sq = 0.0
    on_device: dict[int, Any] = {}  # per array module: one device scalar, one copy at the end
    for g in grads:
        xp = _device_module(g)
        if xp is None:
            norm_sq += _sum_sq(g)
        else:
            part = _device_sum_sq(xp, g)
            on_device[id(xp)] = on_device[id(xp)] + part if id(xp) in on_device else part
    norm_sq += sum(float(total) for total in on_device.values())
    if norm_sq > max_norm * max_norm and norm_sq > 0.0:
        return min(1.0, max_norm / math.sqrt(norm_sq))
    return 1.0
