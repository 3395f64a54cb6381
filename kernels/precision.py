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

from stepd.wire import BF16, DTYPE_NAMES, F16, F32, narrow, widen

GRAD_DTYPES = (F32, BF16, F16)
# Each 16-bit dtype's exponent mask (all ones: Inf or NaN).
EXPONENT_MASK = {BF16: 0x7F80, F16: 0x7C00}
# The kernel-name suffix of each gradient dtype.
SUFFIX = {F32: "", BF16: "_bf16", F16: "_f16"}

__all__ = [
    "BF16",
    "DTYPE_NAMES",
    "EXPONENT_MASK",
    "F16",
    "F32",
    "GRAD_DTYPES",
    "SUFFIX",
    "all_finite",
    "narrow",
    "negated",
    "widen",
]


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
