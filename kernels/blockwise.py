r"""Blockwise 8-bit optimizer state: the Python side of ``csrc/blockwise8.cuh``.

A state slot ``s`` of n elements is stored as ``s`` (uint8 codes, the parameter's shape)
and ``s_absmax`` (float32, one per block of :data:`BLOCK` elements), as in bitsandbytes'
8-bit optimizers (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"):

.. math::
    s_i = \mathrm{map}[c_i] \cdot \mathrm{absmax}_{\lfloor i / 256 \rfloor}, \qquad
    c_i = \arg\min_c |\mathrm{map}[c] - s_i / \mathrm{absmax}|

with the *dynamic* map (Dettmers 2016): a decimal exponent 10^-6..10^0 and a linear
fraction whose bits shrink as the exponent does, so small values keep their relative
precision. Momenta use the signed map, second moments the unsigned one (twice the fraction
values, no sign). Ties go to the lower code. A step dequantizes, runs the float32 update,
takes each block's new absmax and requantizes, in one pass (:class:`BlockwiseOp`).

The maps are built here from that definition, in float64 rounded once to float32; they
agree with ``bitsandbytes.functional.create_dynamic_map`` to two float32 ulps (bitsandbytes
sums in float32). Rounding is to the nearest code with neighbours parting at their float32
midpoint, as bitsandbytes' CUDA kernels compare (its CPU backend approximates that through a
table of 65536 bins over [-1, 1]); unlike them, a small negative momentum may round to 0.
:func:`tables` packs the maps, with the lookup tables the kernels quantize with, in the
layout of ``QuantTables``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace
from typing import Any

import numpy as np

from .ops import Op

BLOCK = 256
SIGNED, UNSIGNED = 0, 1
_LUT_MANTISSA_BITS = 8
_LUT_MIN_EXPONENT = 127 - 24
_LUT_ENTRIES = 25 << _LUT_MANTISSA_BITS
_F32 = np.dtype(np.float32)
CODES = np.dtype(np.uint8)


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 ascending values of the dynamic quantization map, float32, in [-1, 1]."""
    values: list[float] = [0.0, 1.0]
    for i in range(7):  # decimal exponent 10^(i - 6); 2^i (signed) or 2^(i+1) fractions
        bounds = np.linspace(0.1, 1.0, (2**i if signed else 2 ** (i + 1)) + 1)
        means = 10.0 ** (i - 6) * (bounds[:-1] + bounds[1:]) / 2.0
        values += means.tolist() + ((-means).tolist() if signed else [])
    out = np.sort(np.array(values)).astype(np.float32)
    assert out.size == 256
    return out


def midpoints(code: np.ndarray) -> np.ndarray:
    """Float32 midpoints of consecutive codes (the rounding boundaries); [255] = +inf."""
    mid = np.full(256, np.inf, dtype=np.float32)
    mid[:255] = (code[:-1] + code[1:]) * np.float32(0.5)
    return mid


def quantize(x: np.ndarray, absmax: np.float32, kind: int) -> np.ndarray:
    """Codes of ``x`` (one block, float32) against ``absmax``: the nearest map value,
    ties to the lower code (the number of midpoints below x / absmax). The reference step
    does the same for all blocks at once."""
    y = x / (absmax if absmax > 0 else np.float32(1.0))
    return np.searchsorted(_mids(kind)[:255], y, side="left").astype(np.uint8)


def dequantize(codes: np.ndarray, absmax: np.ndarray, kind: int) -> np.ndarray:
    """Float32 values of ``codes`` (flat) with one absmax per :data:`BLOCK` elements."""
    per_element = np.repeat(absmax.astype(np.float32), BLOCK)[: codes.size]
    return _maps()[kind][codes] * per_element


@cache
def _maps() -> tuple[np.ndarray, np.ndarray]:
    return dynamic_map(True), dynamic_map(False)


@cache
def _mids(kind: int) -> np.ndarray:
    return midpoints(_maps()[kind])


def _lut(mid: np.ndarray, negative: bool) -> np.ndarray:
    """Per interval of |y| (its exponent and top mantissa bits), for y of one sign: how many
    midpoints lie below every y of it, and the low bits of the midpoint inside it (at most
    one: checked), which the kernel compares with y's; see ``quantize`` in the header."""
    shift = 23 - _LUT_MANTISSA_BITS
    keys = np.arange(_LUT_ENTRIES, dtype=np.uint32) + (_LUT_MIN_EXPONENT << _LUT_MANTISSA_BITS)
    lo = (keys << shift).view(np.float32)  # each interval's smallest |y|
    hi = ((keys + 1) << shift).view(np.float32)  # the next one's
    lo[0] = 0.0  # the first interval also takes everything below 2^-24
    finite = mid[:255]
    if negative:  # y in (-hi, -lo]: midpoints <= -hi are below every y of it
        count = np.searchsorted(finite, -hi, side="right")
        end = np.searchsorted(finite, -lo, side="right")
    else:  # y in [lo, hi): midpoints < lo are below every y
        count = np.searchsorted(finite, lo, side="left")
        end = np.searchsorted(finite, hi, side="left")
    inside = end - count
    if inside.max() > 1:
        raise AssertionError("quantization lookup intervals are wider than the code gaps")
    low_bits = np.abs(mid[np.minimum(count, 254)]).view(np.uint32) & ((1 << shift) - 1)
    never = 0 if negative else (1 << shift) - 1  # low < 0 and low > 2^15 - 1 are never true
    threshold = np.where(inside == 1, low_bits, never).astype(np.uint32)
    return count.astype(np.uint32) | (threshold << 8)


@cache
def tables() -> np.ndarray:
    """``QuantTables`` as bytes (a read-only uint8 array): the maps, then the lookup tables."""
    parts = [np.concatenate(_maps()).view(np.uint8)]
    for kind in (SIGNED, UNSIGNED):
        for negative in (False, True):
            parts.append(_lut(_mids(kind), negative).view(np.uint8))
    out = np.concatenate(parts)
    out.flags.writeable = False
    return out


def absmax_shape(shape: tuple[int, ...]) -> tuple[int]:
    return (-(-math.prod(shape) // BLOCK),)


@dataclass(frozen=True)
class BlockwiseOp:
    """An 8-bit variant of a float32 op with one or two slots: its slots become uint8
    codes (slot 0 on the signed map, slot 1 on the unsigned one) plus per-block absmax."""

    name: str  # the kernel, ``stepd_<name>``
    inner: Op  # the float32 update and its Args

    @property
    def states(self) -> tuple[str, ...]:
        return self.inner.slots

    @property
    def slots(self) -> tuple[str, ...]:
        """The buffers in kernel order: codes per state, then absmax per state."""
        return (*self.states, *(f"{s}_absmax" for s in self.states))

    @property
    def args(self) -> tuple[str, ...]:
        return self.inner.args

    def pack(self, scalars: dict[str, float]) -> np.ndarray:
        return self.inner.pack(scalars)

    def unpack(self, row: np.ndarray) -> SimpleNamespace:
        return self.inner.unpack(row)

    def reference(self, p: np.ndarray, g: np.ndarray, arrays: list[Any], a: Any) -> None:
        """The readable spec, on flat NumPy arrays (float32 g): dequantize, the float32
        update, then each block's absmax and codes. Rounds as the kernels do."""
        k = len(self.states)
        codes, absmaxes = arrays[:k], arrays[k:]
        kinds = [SIGNED, UNSIGNED][:k]
        values = [dequantize(c, m, kind) for c, m, kind in zip(codes, absmaxes, kinds, strict=True)]
        self.inner.reference(p, g, values, a)
        for c, m, v, kind in zip(codes, absmaxes, values, kinds, strict=True):
            blocks = np.zeros((m.size, BLOCK), np.float32)  # zero padding: |0| changes no max
            blocks.reshape(-1)[: v.size] = v
            m[...] = np.abs(blocks).max(axis=1, initial=np.float32(0.0))
            divisor = np.where(m > 0, m, np.float32(1.0))
            y = (blocks / divisor[:, None]).reshape(-1)[: v.size]
            c[...] = np.searchsorted(_mids(kind)[:255], y, side="left")
