"""The fused CPU backend: the compiled ``csrc/cpu.cpp`` called through ctypes."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import numpy as np

from ..ops import MAX_ARGS, MAX_SLOTS, Launch, Op
from .build import build_cpu_library

_i64p = ctypes.POINTER(ctypes.c_int64)
_f32p = ctypes.POINTER(ctypes.c_float)
_vpp = ctypes.POINTER(ctypes.c_void_p)


def _addr(a: np.ndarray) -> int:
    # 4x cheaper than `a.ctypes.data`, which matters at hundreds of tensors per batch; a
    # read-only buffer (a gradient straight from request bytes) takes the slower path.
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(a))
    except (TypeError, ValueError):
        return a.ctypes.data


class CpuBackend:
    """Steps lists of NumPy float32 tensors with one call into the OpenMP kernels."""

    name = "cpu"
    xp = np

    def __init__(self) -> None:
        self.library_path = build_cpu_library()
        self._lib = ctypes.CDLL(str(self.library_path))
        if (self._lib.stepd_max_slots(), self._lib.stepd_max_args()) != (MAX_SLOTS, MAX_ARGS):
            raise RuntimeError(f"{self.library_path} was built for other slot/arg limits")
        self._fns: dict[str, ctypes._CFuncPtr] = {}

    def _fn(self, op: Op) -> ctypes._CFuncPtr:
        fn = self._fns.get(op.name)
        if fn is None:
            nargs = getattr(self._lib, f"stepd_{op.name}_nargs")()
            nslots = getattr(self._lib, f"stepd_{op.name}_nslots")()
            if (nargs, nslots) != (len(op.args), len(op.slots)):
                raise RuntimeError(
                    f"op {op.name}: the C++ struct has {nargs} args / {nslots} slots, Python "
                    f"declares {len(op.args)} / {len(op.slots)}"
                )
            fn = getattr(self._lib, f"stepd_{op.name}")
            fn.argtypes = [ctypes.c_int64, _i64p, _vpp, _vpp, _vpp, _f32p]
            fn.restype = None
            self._fns[op.name] = fn
        return fn

    def launch(self, op: Op, items: Sequence[Launch]) -> None:
        fn = self._fn(op)
        n = len(items)
        sizes = np.fromiter((it.param.size for it in items), dtype=np.int64, count=n)
        params = np.fromiter((_addr(it.param) for it in items), dtype=np.uint64, count=n)
        grads = np.fromiter((_addr(it.grad) for it in items), dtype=np.uint64, count=n)
        slots = np.zeros((n, MAX_SLOTS), dtype=np.uint64)
        for k, it in enumerate(items):
            for j, s in enumerate(it.slots):
                slots[k, j] = _addr(s)
        args = np.stack([it.args for it in items]) if n > 1 else items[0].args
        fn(
            n,
            sizes.ctypes.data_as(_i64p),
            params.ctypes.data_as(_vpp),
            grads.ctypes.data_as(_vpp),
            slots.ctypes.data_as(_vpp),
            np.ascontiguousarray(args, dtype=np.float32).ctypes.data_as(_f32p),
        )
