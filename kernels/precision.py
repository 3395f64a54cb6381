"""Gradients in the model's precision: float32, bfloat16 or float16.

Mixed-precision training keeps float32 master weights and float32 optimizer state, and its
gradients arrive in the model's dtype. The fused elementwise kernels read a bfloat16 or
float16 gradient directly (converted per element in registers, no separate cast pass);
every other path widens it first. Widening is exact, so the result is the same bits as
stepping the widened gradient.

NumPy has no bfloat16 type: a bfloat16 array is held as its bits, a ``uint16`` array (the
upper half of the float32 with the same sign, exponent and leading mantissa bits). In stepd a
``uint16`` gradient always means bfloat16.
"""

from __future__ import annotations

from typing import Any

import numpy as np

F32 = np.dtype(np.float32)
BF16 = np.dtype(np.uint16)  # bfloat16 bits
F16 = np.dtype(np.float16)
GRAD_DTYPES = (F32, BF16, F16)
# Names users and the wire use, and each dtype's exponent mask (all ones: Inf or NaN).
NAMES: dict[np.dtype, str] = {F32: "float32", BF16: "bfloat16", F16: "float16"}
BY_NAME = {name: dtype for dtype, name in NAMES.items()}
EXPONENT_MASK = {BF16: 0x7F80, F16: 0x7C00}
# The kernel-name suffix of each gradient dtype.
SUFFIX = {F32: "", BF16: "_bf16", F16: "_f16"}


def dtype_named(name: str) -> np.dtype:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"unknown gradient dtype {name!r}; expected one of {', '.join(BY_NAME)}"
        ) from None


def widen(xp: Any, grad: Any) -> Any:
    """``grad`` as float32 (exact); a float32 array is returned as it is."""
    if grad.dtype == F32:
        return grad
    if grad.dtype == BF16:
        return (grad.astype(xp.uint32) << 16).view(xp.float32)
    return grad.astype(xp.float32)


def narrow(xp: Any, x: Any, dtype: np.dtype) -> Any:
    """float32 ``x`` rounded to ``dtype``, to nearest even (what torch's ``.to()`` does)."""
    if dtype == F32:
        return x
    if dtype == F16:
        with np.errstate(over="ignore"):  # beyond float16's range is Inf, as in torch
            return x.astype(xp.float16)
    bits = xp.ascontiguousarray(x, dtype=xp.float32).view(xp.uint32)
    # Round to nearest even on the 16 bits dropped: add 0x7FFF plus the kept LSB. NaN
    # (never a parameter: they are screened) would need a quiet bit; no other case does.
    rounded = bits + (xp.uint32(0x7FFF) + ((bits >> 16) & xp.uint32(1)))
    return (rounded >> 16).astype(xp.uint16)


def all_finite(xp: Any, grad: Any) -> bool:
    """No Inf or NaN in a low-precision ``grad`` (its exponent bits never all ones)."""
    bits = grad.view(xp.uint16) if grad.dtype == F16 else grad
    mask = EXPONENT_MASK[grad.dtype]
    return not bool(((bits & xp.uint16(mask)) == mask).any())


def negated(xp: Any, grad: Any) -> Any:
    """``-grad`` as a new array of its dtype and shape (a 0-d array stays an array)."""
    if grad.dtype == BF16:
        return grad ^ xp.uint16(0x8000)  # flip the sign bit: exact, as negation is
    out = xp.empty_like(grad)
    xp.negative(grad, out=out)
    return out
