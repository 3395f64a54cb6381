"""The CUDA backend: ``csrc/cuda.cu`` compiled by NVRTC through CuPy, on CuPy arrays.

Kernels are fetched by name from one cached ``RawModule`` (CuPy also caches the binary on
disk). A single tensor is stepped with its scalars as kernel parameters; a list of tensors
goes in one launch through a device-side table of pointers.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

from .. import precision
from ..ops import MAX_SLOTS, Launch, Op, by_grad_dtype
from ..precision import F32, SUFFIX
from .cuda_source import NVRTC_OPTIONS, cuda_source

_THREADS = 256
_MAX_GRID_Y = 65535  # the table row is blockIdx.y


@cache
def _module():
    import cupy

    return cupy.RawModule(code=cuda_source(), options=NVRTC_OPTIONS)


def _blocks(n: int, cap: int) -> int:
    return max(1, min(cap, -(-n // (_THREADS * 4))))


class CudaBackend:
    name = "cuda"

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self._cupy = cupy
        dev = cupy.cuda.Device()
        self._max_blocks = dev.attributes["MultiProcessorCount"] * 8
        self._module = _module()

    def all_finite(self, x: Any) -> bool:  # x: a cupy.ndarray
        if x.dtype == F32:
            return bool(self._cupy.isfinite(x).all())
        return precision.all_finite(self._cupy, x)

    def launch(self, op: Op, items: Sequence[Launch]) -> None:
        dtype = items[0].grad.dtype
        if any(it.grad.dtype != dtype for it in items):  # one kernel per gradient dtype
            for group in by_grad_dtype(items):
                self.launch(op, group)
            return
        if len(items) == 1 and dtype == F32:
            it = items[0]
            slots = [*it.slots, *[None] * (MAX_SLOTS - len(it.slots))]
            ptrs = [s.data.ptr if s is not None else 0 for s in slots]
            n = it.param.size
            kernel = self._module.get_function(f"stepd_{op.name}")
            kernel(
                (_blocks(n, self._max_blocks),),
                (_THREADS,),
                (
                    it.param,
                    it.grad,
                    *[np.uint64(p) for p in ptrs],
                    np.int64(n),
                    *[np.float32(x) for x in it.args],
                ),
            )
            return
        for lo in range(0, len(items), _MAX_GRID_Y):
            self._launch_multi(op, items[lo : lo + _MAX_GRID_Y])

    def _launch_multi(self, op: Op, items: Sequence[Launch]) -> None:
        cp = self._cupy
        table = np.zeros((len(items), 3 + MAX_SLOTS), dtype=np.int64)
        for k, it in enumerate(items):
            table[k, 0] = it.param.data.ptr
            table[k, 1] = it.grad.data.ptr
            for j, s in enumerate(it.slots):
                table[k, 2 + j] = s.data.ptr
            table[k, 2 + MAX_SLOTS] = it.param.size
        args = np.stack([it.args for it in items])
        max_n = max(it.param.size for it in items)
        blocks_x = _blocks(max_n, max(1, self._max_blocks * 4 // len(items)))
        kernel = self._module.get_function(f"stepd_{op.name}_multi{SUFFIX[items[0].grad.dtype]}")
        kernel((blocks_x, len(items)), (_THREADS,), (cp.asarray(table), cp.asarray(args)))
