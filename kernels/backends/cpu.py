"""The fused CPU backend: the compiled ``csrc/cpu.cpp`` called through ctypes."""

from __future__ import annotations

import ctypes
from _ctypes import CFuncPtr  # the type of a loaded C function (ctypes._CFuncPtr)
from collections.abc import Sequence

import numpy as np

from ..ops import MAX_ARGS, MAX_SLOTS, Launch, Op, by_grad_dtype
from ..precision import EXPONENT_MASK, F32, SUFFIX
from .build import build_cpu_library


def _addr(a: np.ndarray) -> int:
    # 4x cheaper than `a.ctypes.data`, which matters at hundreds of tensors per batch; a
    # read-only buffer (a gradient straight from request bytes) takes the slower path.
    try:
        # An ndarray exports the buffer protocol; numpy's stubs declare __buffer__ for
        # Python >= 3.12 only, so the 3.11 checker does not see it as a Buffer.
        return ctypes.addressof(ctypes.c_char.from_buffer(a))  # type: ignore[arg-type]
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
        self._fns: dict[str, CFuncPtr] = {}
        self._all_finite = self._lib.stepd_all_finite
        self._all_finite.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        self._all_finite_16 = self._lib.stepd_all_finite_16
        self._all_finite_16.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint16]

    def all_finite(self, x: np.ndarray) -> bool:
        """True when no element of the contiguous array ``x`` (float32, or bfloat16/float16
        bits, see :mod:`stepd.kernels.precision`) is NaN or ±Inf."""
        if x.dtype == F32:
            return bool(self._all_finite(_addr(x), x.size))
        return bool(self._all_finite_16(_addr(x), x.size, EXPONENT_MASK[x.dtype]))

    def _fn(self, op: Op, grad_dtype: np.dtype = F32) -> CFuncPtr:
        key = op.name + SUFFIX[grad_dtype]
        fn = self._fns.get(key)
        if fn is None:
            nargs = getattr(self._lib, f"stepd_{op.name}_nargs")()
            nslots = getattr(self._lib, f"stepd_{op.name}_nslots")()
            if (nargs, nslots) != (len(op.args), len(op.slots)):
                raise RuntimeError(
                    f"op {op.name}: the C++ struct has {nargs} args / {nslots} slots, Python "
                    f"declares {len(op.args)} / {len(op.slots)}"
                )
            fn = getattr(self._lib, f"stepd_{key}")
            # Plain addresses (ints), not `data_as` pointers: converting those costs ~2 us a call,
            # which is most of a small step.
            fn.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
            fn.restype = None
            self._fns[key] = fn
        return fn

    def prepare(self, op: Op, items: Sequence[Launch]) -> PreparedLaunch:
        """A launch over these params and slots, to be run again with new grads and args."""
        return PreparedLaunch(self._fn(op), op, items)

    def launch(self, op: Op, items: Sequence[Launch]) -> None:
        dtype = items[0].grad.dtype
        if any(it.grad.dtype != dtype for it in items):  # one call per gradient dtype
            for group in by_grad_dtype(items):
                self.launch(op, group)
            return
        fn = self._fn(op, dtype)
        # One flat int64 table, one row per tensor: p, g, slots (zero-padded), element count.
        pad = (0,) * (MAX_SLOTS - len(op.slots))
        table: list[int] = []
        for it in items:
            table += (_addr(it.param), _addr(it.grad), *map(_addr, it.slots), *pad)
            table.append(it.param.size)
        shared = items[0].args
        if all(it.args is shared for it in items):
            args, stride = shared, 0
        else:
            args, stride = np.stack([it.args for it in items]), MAX_ARGS
        rows = np.array(table, dtype=np.int64)
        fn(len(items), _addr(rows), _addr(args), stride)


class PreparedLaunch:
    """The pointer table of one launch, kept: per call only the gradients and the scalars
    change. Building the table costs ~2 us per tensor, more than stepping a small one.

    It keeps the slots alive; the params it does not: the caller runs it only with the very
    param arrays it was prepared for, alive (kernels.Optimizer checks their identity).
    """

    def __init__(self, fn: CFuncPtr, op: Op, items: Sequence[Launch]) -> None:
        pad = (0,) * (MAX_SLOTS - len(op.slots))
        rows = [(_addr(it.param), 0, *map(_addr, it.slots), *pad, it.param.size) for it in items]
        self._fn = fn
        self._keep = [tuple(it.slots) for it in items]
        self._count = len(items)
        self._table = np.array(rows, dtype=np.int64)
        self._grads = self._table[:, 1]
        self._table_addr = _addr(self._table)

    def run(self, grads: Sequence[np.ndarray], args: np.ndarray, stride: int) -> None:
        """``grads`` in the order of the prepared items (contiguous float32, checked by the
        caller); ``args`` one row (``stride`` 0) or one row per item (``MAX_ARGS``)."""
        self._grads[:] = [_addr(g) for g in grads]
        self._fn(self._count, self._table_addr, _addr(args), stride)
