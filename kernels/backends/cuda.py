"""The CUDA backend: ``csrc/cuda.cu`` compiled by NVRTC (``cuda_source.build_module``), on
CuPy arrays.

The module is built for the device's arch with our own options (never CuPy's compile, which
appends ``-ftz=true``), cached on disk and loaded once with ``cupy.RawModule(path=...)``. A
single float32 tensor is stepped with its scalars as kernel parameters; a list of tensors
(and any low-precision gradient) goes in one chunked multi-tensor launch: a device-side
table of tensors and one of fixed-size chunks over all of them, one block per chunk.

Work is ordered on an explicit stream of the backend (one per process and device:
``get_backend`` is cached), never on whatever stream is current: launches enter it, and the
store runs its device work inside it (``with backend.stream:``). It is a *blocking* stream
(``non_blocking=False``): a host read left on the legacy default stream (``.get()`` outside
the store) still waits for its work, so a path that forgets the stream is slow, not wrong.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

from .. import blockwise, precision
from ..blockwise import BlockwiseOp
from ..ops import MAX_ARGS, MAX_SLOTS, Launch, Op, by_grad_dtype
from ..precision import F32, SUFFIX
from .cuda_source import build_module, cuda_source, device_arch

_THREADS = 256
# Elements per block of a multi-tensor launch (64 per thread): small enough that a batch of
# small tensors still fills the device, large enough that the work table stays small.
CHUNK = 1 << 14
_MAX_GRID_X = 2**31 - 1
_HOST_CHUNK = 1 << 22  # elements per pass of a host-side finiteness check (bounds its temp)
# Device tables kept for layouts stepped again (a model's step_batch each iteration): the
# newest this many of each kind. A work table has a row per CHUNK elements: MBs for a large
# model, uploaded once rather than every step.
_TABLES_KEPT = 8


@cache
def _module() -> Any:
    import cupy
    from cupy_backends.cuda.libs import nvrtc

    arch = device_arch(cupy.cuda.Device().compute_capability, nvrtc.getSupportedArchs())
    return cupy.RawModule(path=str(build_module(arch)))


def _blocks(n: int, cap: int) -> int:
    return max(1, min(cap, -(-n // (_THREADS * 4))))


def entry_points() -> list[str]:
    """Every kernel of the module, by name (as ``csrc/cuda.cu`` declares them)."""
    ops = re.findall(r"^STEPD_OP\((\w+),", cuda_source(), re.M)
    blockwise_ops = re.findall(r"^STEPD_BLOCKWISE_OP\((\w+),", cuda_source(), re.M)
    return [
        f"stepd_{op}{kind}" for op in ops for kind in ("", *(f"_multi{s}" for s in SUFFIX.values()))
    ] + [f"stepd_{op}{s}" for op in blockwise_ops for s in SUFFIX.values()]


def chunk_table(sizes: np.ndarray, chunk: int) -> np.ndarray:
    """The work of a multi-tensor launch: one (tensor index, first element) row per
    ``chunk`` elements of every tensor, in order; an empty tensor has no row."""
    counts = -(-sizes // chunk)
    first = np.cumsum(counts) - counts
    index = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)
    starts = (np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)) * chunk
    return np.stack([index, starts], axis=1)


def host_all_finite(x: np.ndarray) -> bool:
    """No NaN or ±Inf in a host array (float32, or bfloat16/float16 bits), in bounded
    passes: what arrives from a request is checked before it is copied to the device."""
    flat = x.reshape(-1)
    for lo in range(0, flat.size, _HOST_CHUNK):
        part = flat[lo : lo + _HOST_CHUNK]
        ok = np.isfinite(part).all() if part.dtype == F32 else precision.all_finite(np, part)
        if not ok:
            return False
    return True


def _kept(tables: dict[bytes, Any], key: bytes, make: Any) -> Any:
    """The device table stored under ``key``, made and kept (the newest _TABLES_KEPT) if new.
    A table is never written after its upload, so launches (and threads) share it; evicting
    one that a queued launch still reads is safe: CuPy's pool reuses freed memory in stream
    order, and every launch is on the backend's stream."""
    table = tables.get(key)
    if table is None:
        table = tables[key] = make()
        while len(tables) > _TABLES_KEPT:
            try:  # the oldest goes (another thread may be evicting too)
                tables.pop(next(iter(tables)), None)
            except (StopIteration, RuntimeError):
                break
    return table


class CudaBackend:
    name = "cuda"

    def __init__(self) -> None:
        import cupy

        self.xp = cupy
        self._cupy = cupy
        dev = cupy.cuda.Device()
        self._max_blocks = dev.attributes["MultiProcessorCount"] * 8
        self._module = _module()
        self._kernels: dict[str, Any] = {}
        self.stream = cupy.cuda.Stream(non_blocking=False)
        # prepared layouts: the work table by the tensors' sizes, the pointer table by its
        # bytes (the same params, slots and gradient buffers as a step before)
        self._work: dict[bytes, Any] = {}
        self._tensors: dict[bytes, Any] = {}

    def all_finite(self, x: Any) -> bool:
        """No NaN or ±Inf in ``x``: a device array, or a host array (a gradient, value or
        Hessian as it arrived), checked where it is: CuPy refuses NumPy arrays."""
        if isinstance(x, np.ndarray):
            return host_all_finite(x)
        if x.dtype == F32:
            return bool(self._cupy.isfinite(x).all())
        return precision.all_finite(self._cupy, x)

    def _kernel(self, name: str) -> Any:
        kernel = self._kernels.get(name)
        if kernel is None:
            kernel = self._kernels[name] = self._module.get_function(name)
        return kernel

    def warm_up(self) -> None:
        """Load every kernel now, not at a first step."""
        for name in entry_points():
            self._kernel(name)

    def self_test(self) -> None:
        """Launch a kernel and a CuPy elementwise op on the device and check them bit for bit
        against the NumPy reference, subnormals included (a flush-to-zero build fails);
        raises ``RuntimeError`` saying what failed."""
        from ..algorithms.sgd import SGD

        cp = self._cupy
        host = np.array([1.0, -2.5, 1e-40, -3e-39, 0.0, 7.0], np.float32)
        grad = np.array([0.5, 0.0, 0.0, 0.0, 1.0, -1.0], np.float32)
        args = SGD.pack({"neg_lr": -0.25, "weight_decay": 0.0})
        want = host.copy()
        SGD.reference(want, grad, [], SGD.unpack(args))
        try:
            for batch in (1, 2):  # the single-tensor kernel and the multi-tensor launch
                dev = [cp.asarray(host) for _ in range(batch)]
                self.launch(SGD, [Launch(d, cp.asarray(grad), [], args) for d in dev])
                for d in dev:
                    got = d.get()
                    if got.tobytes() != want.tobytes():
                        raise RuntimeError(f"kernel result {got} != reference {want}")
            doubled = (cp.asarray(host) * np.float32(2)).get()
            if doubled.tobytes() != (host * np.float32(2)).tobytes():
                raise RuntimeError(f"CuPy elementwise result {doubled} is wrong")
        except RuntimeError:
            raise
        except Exception as exc:  # a driver or launch error: say which
            raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc

    def launch(self, op: Op, items: Sequence[Launch]) -> None:
        with self.stream:
            self._launch(op, items)

    def _launch(self, op: Op, items: Sequence[Launch]) -> None:
        dtype = items[0].grad.dtype
        if any(it.grad.dtype != dtype for it in items):  # one kernel per gradient dtype
            for group in by_grad_dtype(items):
                self._launch(op, group)
            return
        if len(items) == 1 and dtype == F32:
            it = items[0]
            slots = [*it.slots, *[None] * (MAX_SLOTS - len(it.slots))]
            ptrs = [s.data.ptr if s is not None else 0 for s in slots]
            n = it.param.size
            if n == 0:
                return
            self._kernel(f"stepd_{op.name}")(
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
        self._launch_multi(op, items)

    def _launch_multi(self, op: Op, items: Sequence[Launch]) -> None:
        cp = self._cupy
        sizes = np.fromiter((it.param.size for it in items), np.int64, len(items))
        if not sizes.any():  # only empty tensors
            return
        tensors = np.zeros((len(items), 3 + MAX_SLOTS), dtype=np.int64)
        for k, it in enumerate(items):
            tensors[k, 0] = it.param.data.ptr
            tensors[k, 1] = it.grad.data.ptr
            for j, s in enumerate(it.slots):
                tensors[k, 2 + j] = s.data.ptr
        tensors[:, 2 + MAX_SLOTS] = sizes
        args = np.stack([it.args for it in items])
        kernel = self._kernel(f"stepd_{op.name}_multi{SUFFIX[items[0].grad.dtype]}")
        work_dev = _kept(self._work, sizes.tobytes(), lambda: cp.asarray(chunk_table(sizes, CHUNK)))
        tensors_dev = _kept(self._tensors, tensors.tobytes(), lambda: cp.asarray(tensors))
        args_dev = cp.asarray(args)  # the step's scalars: new every step
        for lo in range(0, len(work_dev), _MAX_GRID_X):
            part = work_dev[lo : lo + _MAX_GRID_X]
            kernel((len(part),), (_THREADS,), (tensors_dev, part, args_dev, np.int64(CHUNK)))

    def prepare(self, op: Op, items: Sequence[Launch]) -> CudaPreparedLaunch | None:
        """A step_batch layout kept by ``kernels.Optimizer`` under its parameter names, as the
        CPU backend's: the tensor table (params, slots, sizes) and the work table are built
        and uploaded once, not per step. None for one tensor: its kernel takes no table."""
        if len(items) < 2:
            return None
        return CudaPreparedLaunch(self, op, items)

    def launch_blockwise(self, op: BlockwiseOp, items: Sequence[Launch]) -> None:
        """An 8-bit step (``csrc/blockwise8.cuh``): one CUDA block per quantization block of
        every tensor, each tensor's rows {p, g, code0, code1, absmax0, absmax1, n}."""
        with self.stream:
            self._launch_blockwise(op, items)

    def _launch_blockwise(self, op: BlockwiseOp, items: Sequence[Launch]) -> None:
        dtype = items[0].grad.dtype
        if any(it.grad.dtype != dtype for it in items):
            for group in by_grad_dtype(items):
                self._launch_blockwise(op, group)
            return
        cp = self._cupy
        sizes = np.fromiter((it.param.size for it in items), np.int64, len(items))
        work = chunk_table(sizes, blockwise.BLOCK)  # (tensor, first element) per block
        if len(work) == 0:
            return
        work[:, 1] //= blockwise.BLOCK  # the kernel takes the block index
        k = len(op.states)
        tensors = np.zeros((len(items), 7), dtype=np.int64)
        for row, it in zip(tensors, items, strict=True):
            row[0], row[1] = it.param.data.ptr, it.grad.data.ptr
            for j in range(k):
                row[2 + j] = it.slots[j].data.ptr
                row[4 + j] = it.slots[k + j].data.ptr
        tensors[:, 6] = sizes
        args = np.stack([it.args for it in items])
        kernel = self._kernel(f"stepd_{op.name}{SUFFIX[dtype]}")
        tensors_dev, args_dev, work_dev = cp.asarray(tensors), cp.asarray(args), cp.asarray(work)
        tables = self._quant_tables()
        for lo in range(0, len(work), _MAX_GRID_X):
            part = work_dev[lo : lo + _MAX_GRID_X]
            kernel((len(part),), (blockwise.BLOCK,), (tensors_dev, part, tables, args_dev))

    def _quant_tables(self) -> Any:
        tables = getattr(self, "_tables", None)
        if tables is None:  # uploaded once, read by every 8-bit launch
            tables = self._tables = self._cupy.asarray(blockwise.tables())
        return tables


class CudaPreparedLaunch:
    """The multi-tensor launch of one layout, kept: per step only the scalars are uploaded,
    and the tensor table again only when the gradient buffers changed. Its tables are the
    backend's kept ones (the same bytes, the same device table), so preparing uploads
    nothing new. Built from float32 launches (kernels.Optimizer prepares for float32
    gradients only).

    It keeps the slots alive; the params it does not: the caller runs it only with the very
    param arrays it was prepared for, alive (kernels.Optimizer checks their identity)."""

    def __init__(self, backend: CudaBackend, op: Op, items: Sequence[Launch]) -> None:
        self._backend = backend
        self._count = len(items)
        self._keep = [tuple(it.slots) for it in items]
        cp = backend._cupy
        table = np.zeros((len(items), 3 + MAX_SLOTS), dtype=np.int64)
        for row, it in zip(table, items, strict=True):
            row[0], row[1] = it.param.data.ptr, it.grad.data.ptr
            for j, s in enumerate(it.slots):
                row[2 + j] = s.data.ptr
            row[2 + MAX_SLOTS] = it.param.size
        self._table = table
        self._kernel = backend._kernel(f"stepd_{op.name}_multi{SUFFIX[F32]}")
        sizes = table[:, 2 + MAX_SLOTS].copy()
        with backend.stream:
            self._table_dev = self._upload_table()
            if not sizes.any():  # only empty tensors
                self._parts: list[Any] = []
                return
            work = _kept(
                backend._work, sizes.tobytes(), lambda: cp.asarray(chunk_table(sizes, CHUNK))
            )
        self._parts = [work[lo : lo + _MAX_GRID_X] for lo in range(0, len(work), _MAX_GRID_X)]

    def _upload_table(self) -> Any:
        cp = self._backend._cupy
        return _kept(self._backend._tensors, self._table.tobytes(), lambda: cp.asarray(self._table))

    def run(self, grads: Sequence[Any], args: np.ndarray, stride: int) -> None:
        """``grads`` (float32 device arrays) in the order of the prepared items; ``args`` one
        row (``stride`` 0) or one row per item."""
        if not self._parts:
            return
        cp = self._backend._cupy
        ptrs = np.fromiter((g.data.ptr for g in grads), np.int64, self._count)
        if stride == 0:
            args = np.broadcast_to(args, (self._count, MAX_ARGS))
        with self._backend.stream:
            if not np.array_equal(ptrs, self._table[:, 1]):  # new gradient buffers
                self._table[:, 1] = ptrs
                self._table_dev = self._upload_table()
            args_dev = cp.asarray(np.ascontiguousarray(args, dtype=np.float32))
            for part in self._parts:
                self._kernel(
                    (len(part),), (_THREADS,), (self._table_dev, part, args_dev, np.int64(CHUNK))
                )
