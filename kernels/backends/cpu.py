"""The fused CPU backend: the compiled ``csrc/cpu.cpp`` called through ctypes."""

from __future__ import annotations

import ctypes
from _ctypes import CFuncPtr  # the type of a loaded C function (ctypes._CFuncPtr)
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

from .. import blockwise
from ..blockwise import BlockwiseOp
from ..ops import MAX_ARGS, MAX_SLOTS, Launch, Op, by_grad_dtype
from ..precision import BF16, EXPONENT_MASK, F16, F32, SUFFIX, narrow
from .build import build_bind_library, build_cpu_library


def _addr(a: np.ndarray) -> int:
    # 4x cheaper than `a.ctypes.data`, which matters at hundreds of tensors per batch; a
    # read-only buffer (a gradient straight from request bytes) takes the slower path.
    try:
        # An ndarray exports the buffer protocol; numpy's stubs declare __buffer__ for
        # Python >= 3.12 only, so the 3.11 checker does not see it as a Buffer.
        return ctypes.addressof(ctypes.c_char.from_buffer(a))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return a.ctypes.data


@cache
def _binder() -> Any:
    """``stepd_bind_grads`` of ``csrc/bind.cpp`` (called with the GIL held), or None where it
    cannot be built."""
    path = build_bind_library()
    if path is None:
        return None
    fn = ctypes.PyDLL(str(path)).stepd_bind_grads
    fn.argtypes = [ctypes.py_object, ctypes.py_object, ctypes.c_int64, ctypes.py_object]
    fn.argtypes += [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_ssize_t
    return fn


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
        ptr, count = ctypes.c_void_p, ctypes.c_int64
        for name, args, result in (
            ("stepd_sum_sq", [ptr, count], ctypes.c_double),
            ("stepd_diff_sum_sq", [ptr, ptr, count], ctypes.c_double),
            ("stepd_copy", [ptr, ptr, count], None),
            ("stepd_narrow_bf16", [ptr, ptr, count], None),
            ("stepd_narrow_f16", [ptr, ptr, count], ctypes.c_int),
        ):
            fn = getattr(self._lib, name)
            fn.argtypes, fn.restype = args, result
        _binder()  # built now, with the kernels, not in the middle of a later step

    def sum_sq(self, x: np.ndarray, minus: np.ndarray | None = None) -> float:
        """The sum of squares of the finite entries of ``x`` (or of ``x - minus``, taken in
        float32), accumulated in float64 across the threads: a contiguous float32 array
        (as :func:`stepd.kernels.norms.l2_norm`, which reads any array on one thread)."""
        if minus is None:
            return float(self._lib.stepd_sum_sq(_addr(x), x.size))
        if minus.size != x.size:
            raise ValueError(f"sizes differ: {x.size} and {minus.size}")
        return float(self._lib.stepd_diff_sum_sq(_addr(x), _addr(minus), x.size))

    def narrow(self, x: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """Float32 ``x`` rounded to bfloat16 (``BF16``: its bits as uint16) or float16, to
        nearest even: :func:`stepd.wire.narrow` bit for bit, in one threaded pass (NumPy's
        takes 13 ms for 8.4M elements on one core)."""
        if dtype == F32:
            return x
        x = np.ascontiguousarray(x, F32)  # the kernel reads x's buffer as laid out
        out = np.empty(x.shape, dtype)
        if dtype == BF16:
            self._lib.stepd_narrow_bf16(_addr(x), _addr(out), x.size)
        elif not self._lib.stepd_narrow_f16(_addr(x), _addr(out), x.size):
            return narrow(np, x, F16)  # built without _Float16
        return out

    def copy_into(self, dst: np.ndarray, src: np.ndarray) -> None:
        """``dst[...] = src`` for contiguous float32 arrays of one size, across the threads."""
        if dst.size != src.size:
            raise ValueError(f"sizes differ: {dst.size} and {src.size}")
        self._lib.stepd_copy(_addr(dst), _addr(src), src.size)

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
        args, stride = _args_table(items)
        rows = np.array(table, dtype=np.int64)
        fn(len(items), _addr(rows), _addr(args), stride)

    def launch_blockwise(self, op: BlockwiseOp, items: Sequence[Launch]) -> None:
        """An 8-bit step (``csrc/blockwise8.cuh``): each item's slots are ``op.slots``
        (uint8 codes per state, then float32 absmax per state)."""
        dtype = items[0].grad.dtype
        if any(it.grad.dtype != dtype for it in items):
            for group in by_grad_dtype(items):
                self.launch_blockwise(op, group)
            return
        fn = self._blockwise_fn(op, dtype)
        k = len(op.states)
        table: list[int] = []
        for it in items:  # {p, g, code0, code1, absmax0, absmax1, n}; absent states are 0
            codes, absmax = list(map(_addr, it.slots[:k])), list(map(_addr, it.slots[k:]))
            pad = [0] * (2 - k)
            table += (_addr(it.param), _addr(it.grad), *codes, *pad, *absmax, *pad)
            table.append(it.param.size)
        args, stride = _args_table(items)
        rows = np.array(table, dtype=np.int64)
        fn(len(items), _addr(rows), self._tables_addr, _addr(args), stride)

    def _blockwise_fn(self, op: BlockwiseOp, grad_dtype: np.dtype) -> CFuncPtr:
        key = op.name + SUFFIX[grad_dtype]
        fn = self._fns.get(key)
        if fn is None:
            nargs = getattr(self._lib, f"stepd_{op.name}_nargs")()
            nstates = getattr(self._lib, f"stepd_{op.name}_nslots")()
            if (nargs, nstates) != (len(op.args), len(op.states)):
                raise RuntimeError(f"op {op.name}: the C++ struct disagrees with Python")
            tables = blockwise.tables()  # cached for the process: its address stays valid
            if self._lib.stepd_quant_tables_bytes() != tables.size:
                raise RuntimeError("QuantTables' layout differs from kernels/blockwise.py")
            self._tables_addr = tables.ctypes.data
            fn = getattr(self._lib, f"stepd_{key}")
            fn.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * 3, ctypes.c_int64]
            fn.restype = None
            self._fns[key] = fn
        return fn


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
        # what bind() checks items against: the params' identities and element counts
        self._ids = np.array([id(it.param) for it in items], dtype=np.int64)
        self._sizes = self._table[:, -1].copy()
        self._binder = _binder()

    def bind(self, items: Sequence[Any], shapes: tuple[tuple[int, ...], ...]) -> bool:
        """Take step_batch's ``items`` (name, shape, param, grad) for :meth:`run_bound`: True
        when each is the very param prepared (alive: the caller knows), writable, of the
        prepared shape (a tuple of ints), with a contiguous float32 gradient of its size,
        both plain ``numpy.ndarray``; checked and the gradients' addresses taken in one C
        loop (``csrc/bind.cpp``). False (nothing concluded: the Python checks decide) where
        that is not built or an item differs."""
        if self._binder is None:
            return False
        ids, sizes, width = _addr(self._ids), _addr(self._sizes), self._table.shape[1]
        miss = self._binder(items, np.ndarray, ids, shapes, sizes, self._table_addr, width, 1)
        return miss < 0

    def run_bound(self, args: np.ndarray, stride: int) -> None:
        """:meth:`run` with the gradients :meth:`bind` took."""
        self._fn(self._count, self._table_addr, _addr(args), stride)

    def run(self, grads: Sequence[np.ndarray], args: np.ndarray, stride: int) -> None:
        """``grads`` in the order of the prepared items (contiguous float32, checked by the
        caller); ``args`` one row (``stride`` 0) or one row per item (``MAX_ARGS``)."""
        self._grads[:] = [_addr(g) for g in grads]
        self._fn(self._count, self._table_addr, _addr(args), stride)


def _args_table(items: Sequence[Launch]) -> tuple[np.ndarray, int]:
    """The kernel arguments of a launch: one row all items share (stride 0), or a row each."""
    shared = items[0].args
    if all(it.args is shared for it in items):
        return shared, 0
    return np.stack([it.args for it in items]), MAX_ARGS
