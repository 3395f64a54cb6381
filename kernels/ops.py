"""Fused elementwise ops: the Python side of ``csrc/ops.cuh``.

An :class:`Op` names one kernel of the C++ list, the order of its state slots and the field
order of its ``Args`` struct (all ``float``). ``reference`` is the same per-element math in
NumPy, written to round exactly as the compiled kernel does (float32 scalars, no fused
multiply-add), so the fused paths are tested against it bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

MAX_SLOTS = 3
MAX_ARGS = 12

Reference = Callable[[np.ndarray, np.ndarray, Sequence[np.ndarray], SimpleNamespace], None]
# A float32 buffer a kernel reads or writes: a numpy.ndarray (cpu, reference) or a
# cupy.ndarray (cuda). CuPy ships no type information, so the checker sees Any.
Array = Any


@dataclass(frozen=True)
class Op:
    name: str
    slots: tuple[str, ...]
    args: tuple[str, ...]
    reference: Reference

    def __post_init__(self) -> None:
        if len(self.slots) > MAX_SLOTS or len(self.args) > MAX_ARGS:
            raise ValueError(f"op {self.name}: at most {MAX_SLOTS} slots and {MAX_ARGS} args")

    def pack(self, scalars: Mapping[str, float]) -> np.ndarray:
        """Scalars in struct order as a float32 row of MAX_ARGS (the tail is padding)."""
        row = np.zeros(MAX_ARGS, dtype=np.float32)
        row[: len(self.args)] = [scalars[k] for k in self.args]
        return row

    def unpack(self, row: np.ndarray) -> SimpleNamespace:
        return SimpleNamespace(**{k: row[i] for i, k in enumerate(self.args)})


@dataclass
class Launch:
    """One tensor's share of a fused launch: everything the kernel reads and writes."""

    param: Array
    grad: Array  # float32, or bfloat16/float16 bits (see precision.py): widened per element
    slots: Sequence[Array]
    args: np.ndarray  # float32[MAX_ARGS], from Op.pack (host memory on every backend)


def by_grad_dtype(items: Sequence[Launch]) -> list[list[Launch]]:
    """``items`` split by gradient dtype, in order of first appearance (one kernel each)."""
    groups: dict[Any, list[Launch]] = {}
    for it in items:
        groups.setdefault(it.grad.dtype, []).append(it)
    return list(groups.values())
