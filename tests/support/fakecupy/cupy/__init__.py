"""A CuPy stand-in for tests: NumPy behind CuPy's host/device rules. NEVER a GPU run.

It proves the Python side of the CUDA path only: which arrays cross between host and
device, how kernels are compiled, loaded and launched, and how their pointer tables are
laid out. It says nothing about the CUDA code itself (its arithmetic, races, occupancy,
flush-to-zero): a kernel "runs" as its op's NumPy reference (``stepd.kernels.ops.Op``),
applied to the memory its pointers name. Results that pass here must still be checked on
a real device (``bench/gpu_check.py``).

It is importable as ``cupy`` only where ``tests/support/fakecuda.py`` puts its folder on
``sys.path`` (``STEPD_TEST_FAKE_CUDA=1``); ``IS_STAND_IN`` marks it.

The rules it enforces, as CuPy does:

- CuPy calls reject NumPy arrays (``TypeError: Unsupported type <class 'numpy.ndarray'>``),
  operators and kernel arguments included; Python and NumPy scalars are accepted.
- No implicit conversion to NumPy: ``np.asarray(device_array)`` raises (CuPy's
  ``__array__``); ``.get()`` / ``cupy.asnumpy`` copy to the host, ``cupy.asarray(host)`` to
  the device.
- Reductions return 0-d device arrays; device arrays' ``flags`` have no ``writeable``.
- ``cupy.linalg`` ignores numerical errors (a failed eigh is NaN, not ``LinAlgError``)
  unless ``cupyx.errstate(linalg="raise")``; :func:`poison_linalg` makes the next calls of
  a routine return NaN, as a cuSOLVER failure does.
- ``RawModule(path=...)`` loads only the entry points a PTX/cubin file has; a launch
  resolves every pointer (``.data.ptr``, table entries) through a registry of live
  allocations and refuses one that points outside them.
- Streams: ``with stream:`` makes a stream current for the calling thread only (CuPy's
  rule); :data:`EVENTS` records, per kernel launch, host-to-device copy, device-to-host
  copy and stream synchronisation, the stream it happened on (``Stream.null``: the legacy
  default stream), so a test can check what was ordered where; :data:`TO_HOST` the bytes
  each device-to-host copy moved, :data:`TO_DEVICE` each host-to-device copy's.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

import numpy as np

IS_STAND_IN = True
__version__ = "0.0-stand-in"

# numpy names that CuPy exposes unchanged (types, constants)
float16, float32, float64 = np.float16, np.float32, np.float64
int8, int16, int32, int64 = np.int8, np.int16, np.int32, np.int64
uint8, uint16, uint32, uint64 = np.uint8, np.uint16, np.uint32, np.uint64
bool_ = np.bool_
dtype = np.dtype
newaxis = None
inf, nan, pi, e = np.inf, np.nan, np.pi, np.e


def _unsupported(x: Any) -> TypeError:
    return TypeError(f"Unsupported type {type(x)}")


# -- allocations: pointers back to device arrays ------------------------------------------

_ALLOCATIONS: dict[int, weakref.ref[np.ndarray]] = {}  # base address -> base buffer


def _register(base: np.ndarray) -> None:
    addr = base.__array_interface__["data"][0]
    if base.nbytes:
        _ALLOCATIONS[addr] = weakref.ref(base, lambda _r, a=addr: _ALLOCATIONS.pop(a, None))


def _base_of(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def resolve(ptr: int, count: int, dtype_: Any) -> np.ndarray:
    """The device memory at ``ptr`` as ``count`` elements of ``dtype_`` (a view), if it lies
    inside one live allocation; else ``ValueError`` (a wild pointer on a GPU)."""
    dt = np.dtype(dtype_)
    nbytes = count * dt.itemsize
    if count == 0:
        return np.empty(0, dt)
    ref = _ALLOCATIONS.get(ptr)
    candidates = [ref] if ref is not None else list(_ALLOCATIONS.values())
    for r in candidates:
        base = r()
        if base is None:
            continue
        start = base.__array_interface__["data"][0]
        if start <= ptr and ptr + nbytes <= start + base.nbytes:
            raw = base.reshape(-1).view(np.uint8)
            off = ptr - start
            return raw[off : off + nbytes].view(dt)
    raise ValueError(f"pointer {ptr:#x} (+{nbytes} bytes) is not inside a live allocation")


class MemoryPointer:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class _Flags:
    """CuPy's flags: no ``writeable`` (device arrays are always writable)."""

    def __init__(self, a: np.ndarray) -> None:
        self.c_contiguous = a.flags.c_contiguous
        self.f_contiguous = a.flags.f_contiguous
        self.owndata = a.base is None

    def __getitem__(self, key: str) -> bool:
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous}[key]


# -- arrays ---------------------------------------------------------------------------------


def _dev(x: Any) -> Any:
    """An argument of a CuPy call as the NumPy object behind it (NumPy arrays refused)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise _unsupported(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_dev(v) for v in x)
    return x


def _wrap(r: Any, outs: Sequence[Any] = ()) -> Any:
    for o in outs:  # `out=` returns the very array passed
        if isinstance(o, ndarray) and r is o._a:
            return o
    if isinstance(r, np.ndarray):
        return ndarray._of(r)
    if isinstance(r, np.generic):  # a reduction: a 0-d array on the device
        return ndarray._of(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


def _call(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    outs = [kwargs.get("out")] if "out" in kwargs else []
    return _wrap(fn(*_dev(args), **{k: _dev(v) for k, v in kwargs.items()}), outs)


class ndarray:
    """A device array: a NumPy array no NumPy code may read directly."""

    __slots__ = ("__weakref__", "_a")
    _a: np.ndarray

    def __init__(self, shape: Any, dtype: Any = float, memptr: Any = None) -> None:
        if memptr is not None:
            raise NotImplementedError("memptr")
        self._a = np.empty(shape, dtype)
        _register(self._a)

    @classmethod
    def _of(cls, a: np.ndarray) -> ndarray:
        out = object.__new__(cls)
        out._a = a
        base = _base_of(a)
        if base.__array_interface__["data"][0] not in _ALLOCATIONS:
            _register(base)
        return out

    # host transfers: explicit only
    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
            "construct a NumPy array explicitly."
        )

    def get(self, stream: Any = None, order: str = "C", out: np.ndarray | None = None) -> Any:
        _record("d2h", stream)
        TO_HOST.append(self._a.nbytes)
        if out is not None:
            np.copyto(out, self._a)
            return out
        return np.array(self._a, order=order, copy=True)

    def set(self, arr: np.ndarray, stream: Any = None) -> None:
        _record("h2d", stream)
        TO_DEVICE.append(np.asarray(arr).nbytes)
        np.copyto(self._a, arr)

    def tolist(self) -> Any:
        TO_HOST.append(self._a.nbytes)
        return self._a.tolist()

    def item(self) -> Any:
        TO_HOST.append(self._a.nbytes)
        return self._a.item()

    # NumPy functions on device arrays dispatch here (as CuPy's do); asarray does not.
    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if method != "__call__":
            return NotImplemented
        return _call(ufunc, inputs, kwargs)

    def __array_function__(self, func: Any, types: Any, args: tuple, kwargs: dict) -> Any:
        mine = globals().get(func.__name__)
        if mine is None or not callable(mine):
            return NotImplemented
        return mine(*args, **kwargs)

    # attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    ndim = property(lambda self: self._a.ndim)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: _Flags(self._a))
    T = property(lambda self: ndarray._of(self._a.T))
    data = property(lambda self: MemoryPointer(self._a.__array_interface__["data"][0]))
    base = property(lambda self: None if self._a.base is None else ndarray._of(_base_of(self._a)))

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Iterator[Any]:
        return (_wrap(v) for v in self._a)

    def __repr__(self) -> str:
        return f"stand-in cupy.{self._a!r}"

    # scalars out of 0-d arrays (CuPy syncs and allows these)
    def __bool__(self) -> bool:
        TO_HOST.append(self._a.nbytes)
        return bool(self._a)

    def __float__(self) -> float:
        TO_HOST.append(self._a.nbytes)
        return float(self._a)

    def __int__(self) -> int:
        TO_HOST.append(self._a.nbytes)
        return int(self._a)

    def __index__(self) -> int:
        return self._a.__index__()

    def __complex__(self) -> complex:
        return complex(self._a)

    # indexing: values may be host arrays (CuPy copies them in)
    def __getitem__(self, key: Any) -> Any:
        return _wrap(self._a[_dev(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        self._a[_dev(key)] = value._a if isinstance(value, ndarray) else value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # no __array_interface__ & co.: NumPy must not see through
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)
        return lambda *args, **kwargs: _call(attr, args, kwargs)


def _binary(name: str) -> Callable[..., Any]:
    def op(self: ndarray, other: Any) -> Any:
        if isinstance(other, np.ndarray):
            raise _unsupported(other)
        return _wrap(getattr(self._a, name)(_dev(other)))

    op.__name__ = name
    return op


def _inplace(name: str) -> Callable[..., Any]:
    def op(self: ndarray, other: Any) -> Any:
        if isinstance(other, np.ndarray):
            raise _unsupported(other)
        getattr(self._a, name)(_dev(other))
        return self

    op.__name__ = name
    return op


for _name in [
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "pow",
    "matmul",
    "and",
    "or",
    "xor",
    "lshift",
    "rshift",
    "radd",
    "rsub",
    "rmul",
    "rtruediv",
    "rfloordiv",
    "rmod",
    "rpow",
    "rmatmul",
    "rand",
    "ror",
    "rxor",
    "lt",
    "le",
    "gt",
    "ge",
    "eq",
    "ne",
]:
    setattr(ndarray, f"__{_name}__", _binary(f"__{_name}__"))
for _name in [
    "add",
    "sub",
    "mul",
    "truediv",
    "floordiv",
    "mod",
    "pow",
    "and",
    "or",
    "xor",
    "lshift",
    "rshift",
]:
    setattr(ndarray, f"__i{_name}__", _inplace(f"__i{_name}__"))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_name}__", lambda self, _n=_name: _wrap(getattr(self._a, f"__{_n}__")()))
ndarray.__hash__ = None  # type: ignore[assignment]


# -- the module's functions -----------------------------------------------------------------


def _host_to_device(obj: Any, dtype_: Any, copy: bool, order: str = "K") -> ndarray:
    if isinstance(obj, ndarray):
        a = obj._a.astype(dtype_ or obj._a.dtype, order=order, copy=copy)
        return obj if (a is obj._a and not copy) else ndarray._of(a)
    _record("h2d")
    a = np.array(obj, dtype=dtype_, order=order, copy=True)
    TO_DEVICE.append(a.nbytes)
    return ndarray._of(a)


def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K", **_: Any) -> ndarray:
    return _host_to_device(obj, dtype, copy, order)


def asarray(a: Any, dtype: Any = None, order: str | None = None, **_: Any) -> ndarray:
    return _host_to_device(a, dtype, False, order or "K")


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    return _host_to_device(a, dtype, False, "C")


def asnumpy(a: Any, stream: Any = None, out: np.ndarray | None = None) -> np.ndarray:
    if isinstance(a, ndarray):
        return a.get(out=out)
    return np.asarray(a) if out is None else np.copyto(out, a) or out  # type: ignore[func-returns-value]


def get_array_module(*args: Any) -> ModuleType:
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


def __getattr__(name: str) -> Any:
    """Every other NumPy function, under the device rules."""
    fn = getattr(np, name, None)
    if fn is None or isinstance(fn, ModuleType):
        raise AttributeError(f"the CuPy stand-in has no {name!r}")
    if isinstance(fn, type) or not callable(fn):
        return fn

    def device_fn(*args: Any, **kwargs: Any) -> Any:
        return _call(fn, args, kwargs)

    device_fn.__name__ = name
    return device_fn


# -- linalg: errors ignored unless asked (cupyx.errstate) -----------------------------------

_LINALG = {"mode": "ignore"}
_POISON: dict[str, int] = {}


def poison_linalg(routine: str, calls: int = 1) -> None:
    """Make the next ``calls`` float32 calls of ``cupy.linalg.<routine>`` fail as cuSOLVER
    does: NaN results (or ``LinAlgError`` under ``errstate(linalg="raise")``)."""
    _POISON[routine] = calls


def _linalg_fn(name: str) -> Callable[..., Any]:
    fn = getattr(np.linalg, name)

    def device_fn(*args: Any, **kwargs: Any) -> Any:
        raw = _dev(args)
        poisoned = _POISON.get(name, 0) > 0 and raw[0].dtype == np.float32
        try:
            if poisoned:
                _POISON[name] -= 1
                raise np.linalg.LinAlgError(f"{name}: poisoned by the test")
            return _wrap(fn(*raw, **_dev(kwargs)))
        except np.linalg.LinAlgError:
            if _LINALG["mode"] == "raise":
                raise
            out = fn(np.zeros_like(raw[0]), *raw[1:], **_dev(kwargs))
            nan_ = np.nan

            def fill(r: Any) -> Any:
                if isinstance(r, tuple):
                    return tuple(fill(v) for v in r)
                return np.full_like(r, nan_)

            return _wrap(fill(tuple(out) if isinstance(out, tuple) else out))

    device_fn.__name__ = name
    return device_fn


linalg = SimpleNamespace(
    **{n: _linalg_fn(n) for n in ("eigh", "qr", "solve", "inv", "cholesky", "svd")},
    norm=lambda *a, **k: _call(np.linalg.norm, a, k),
    LinAlgError=np.linalg.LinAlgError,
)


# -- random ---------------------------------------------------------------------------------


class _Generator:
    def __init__(self, seed: Any) -> None:
        self._g = np.random.default_rng(seed)

    def standard_normal(self, size: Any = None, dtype: Any = np.float64) -> ndarray:
        return ndarray._of(np.asarray(self._g.standard_normal(size, dtype=dtype)))

    def random(self, size: Any = None, dtype: Any = np.float64) -> ndarray:
        return ndarray._of(np.asarray(self._g.random(size, dtype=dtype)))


class _Philox4x3210:
    """CuPy's counter-based bit generator: here NumPy's Philox (another variant, 4x64), so
    the stand-in's draws are deterministic in the seed as CuPy's are, not equal to them."""

    def __init__(self, seed: Any) -> None:
        self.seed = seed


def _generator(bit_generator: _Philox4x3210) -> _Generator:
    g = _Generator(None)
    g._g = np.random.Generator(np.random.Philox(bit_generator.seed))
    return g


random = SimpleNamespace(default_rng=_Generator, Generator=_generator, Philox4x3210=_Philox4x3210)


# -- the device, streams, memory ------------------------------------------------------------

PROBE_FAILS: list[str] = []  # a test's reason to make the next kernel launch fail


class _Device:
    compute_capability = "90"
    attributes: ClassVar[dict[str, int]] = {"MultiProcessorCount": 132}
    mem_info = (100 << 30, 140 << 30)

    def __init__(self, device: int = 0) -> None:
        self.id = device

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _Stream:
    null: Any = None

    def __init__(self, null: bool = False, non_blocking: bool = False, **_: Any) -> None:
        self.non_blocking = non_blocking

    def synchronize(self) -> None:
        _record("sync", self)

    def __enter__(self) -> _Stream:
        _current().append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        stack = _current()
        if not stack or stack[-1] is not self:
            raise RuntimeError("stream context exited out of order")
        stack.pop()


_Stream.null = _Stream()
_streams = threading.local()
# (what, stream): "launch", "h2d", "d2h" or "sync", and the stream it was ordered on
EVENTS: list[tuple[str, _Stream]] = []
TO_HOST: list[int] = []  # the bytes of every device-to-host copy (scalars out of 0-d included)
TO_DEVICE: list[int] = []  # the bytes of every host-to-device copy


def _current() -> list[_Stream]:
    stack = getattr(_streams, "stack", None)
    if stack is None:
        stack = _streams.stack = []
    return stack


def get_current_stream() -> _Stream:
    stack = _current()
    return stack[-1] if stack else _Stream.null


def _record(what: str, stream: Any = None) -> None:
    EVENTS.append((what, stream if stream is not None else get_current_stream()))


class CUDADriverError(RuntimeError):
    pass


def _device_count() -> int:
    return 1


cuda = SimpleNamespace(
    Device=_Device,
    Stream=_Stream,
    get_current_stream=get_current_stream,
    runtime=SimpleNamespace(
        getDeviceCount=_device_count,
        deviceSynchronize=lambda: None,
        hostRegister=lambda addr, size, flags: None,
        hostUnregister=lambda addr: None,
        runtimeGetVersion=lambda: 12040,
        driverGetVersion=lambda: 12040,
    ),
    driver=SimpleNamespace(CUDADriverError=CUDADriverError),
    compiler=SimpleNamespace(),
)


# -- kernels: NVRTC output loaded, launches run the ops' NumPy references -------------------


def _ops() -> dict[str, Any]:
    """Every fused op by name, collected from the algorithm modules (the kernels' list)."""
    import pkgutil

    import stepd.kernels.algorithms as algorithms
    from stepd.kernels.blockwise import BlockwiseOp
    from stepd.kernels.ops import Op

    found: dict[str, Any] = {}
    for info in pkgutil.iter_modules(algorithms.__path__):
        mod = importlib.import_module(f"{algorithms.__name__}.{info.name}")
        for value in vars(mod).values():
            if isinstance(value, (Op, BlockwiseOp)):
                found[value.name] = value
    return found


def _entries(path: Path) -> set[str] | None:
    data = path.read_bytes()
    if data[:4] == b"\x7fELF":  # a cubin: its symbol names are in the string table
        return {m.decode() for m in re.findall(rb"(stepd_\w+)\x00", data)}
    return set(re.findall(r"\.entry\s+(\w+)\(", data.decode()))


class RawModule:
    """A loaded module: ``path`` (PTX or cubin written by NVRTC) or ``code`` (refused: the
    backend must compile its own, see kernels/backends/cuda.py)."""

    def __init__(
        self, code: str | None = None, path: str | None = None, options: Any = (), **_: Any
    ) -> None:
        if path is None:
            raise RuntimeError(
                "the stand-in loads compiled modules only (RawModule(path=...)): CuPy's own "
                "compile appends -ftz=true"
            )
        entries = _entries(Path(path))
        if not entries:
            raise RuntimeError(f"{path}: no kernels in it")
        self.path = path
        self.entries = entries

    def get_function(self, name: str) -> RawKernel:
        if name not in self.entries:
            raise CUDADriverError(f"CUDA_ERROR_NOT_FOUND: named symbol not found: {name}")
        return RawKernel(name)


_KERNEL_NAME = re.compile(r"^stepd_(\w+?)(_multi)?(_bf16|_f16)?$")
_GRAD_DTYPE = {None: np.float32, "_bf16": np.uint16, "_f16": np.float16}
LAUNCHES: list[tuple[str, tuple[int, ...], int]] = []  # (kernel, grid, table rows): for tests


class RawKernel:
    def __init__(self, name: str) -> None:
        m = _KERNEL_NAME.match(name)
        if m is None:
            raise CUDADriverError(f"the stand-in does not know kernel {name}")
        self.name = name
        self.op_name, self.multi, suffix = m.group(1), bool(m.group(2)), m.group(3)
        self.grad_dtype = np.dtype(_GRAD_DTYPE[suffix])
        ops = _ops()
        if self.op_name not in ops:
            raise CUDADriverError(f"no reference for kernel {name}")
        self.op = ops[self.op_name]

    def __call__(
        self, grid: tuple, block: tuple, args: tuple, stream: Any = None, **_: Any
    ) -> None:
        if PROBE_FAILS:
            raise CUDADriverError(PROBE_FAILS.pop(0))
        _record("launch", stream)
        for a in args:
            if isinstance(a, np.ndarray):
                raise _unsupported(a)
            if not isinstance(a, (ndarray, np.generic, int, float)):
                raise _unsupported(a)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        if grid[0] < 1 or grid[0] > 2**31 - 1 or grid[1] > 65535 or grid[2] > 65535:
            raise CUDADriverError(f"CUDA_ERROR_INVALID_VALUE: grid {grid}")
        from stepd.kernels.blockwise import BlockwiseOp

        if isinstance(self.op, BlockwiseOp):
            self._blockwise(grid, block, args)
        elif self.multi:
            self._table(grid, args)
        else:
            self._single(args)

    def _blockwise(self, grid: tuple, block: tuple, args: tuple) -> None:
        """csrc/cuda.cu's 8-bit launch: block b steps quantization block ``work[b]`` (tensor
        index, block index) of ``tensors`` rows {p, g, code0, code1, absmax0, absmax1, n}
        with the uploaded QuantTables; it runs as the op's reference on that block."""
        from stepd.kernels import blockwise
        from stepd.kernels.ops import MAX_ARGS

        from stepd.wire import widen

        if len(args) != 4:
            raise CUDADriverError(f"{self.name}: {len(args)} arguments, expected 4")
        tensors, work, tables, scalars = args
        for a in args:
            if not isinstance(a, ndarray):
                raise _unsupported(a)
        if tensors.dtype != np.int64 or work.dtype != np.int64 or scalars.dtype != np.float32:
            raise CUDADriverError(f"{self.name}: table dtypes")
        if tables._a.tobytes() != blockwise.tables().tobytes():
            raise CUDADriverError(f"{self.name}: not the host's QuantTables")
        if tuple(block)[:1] != (blockwise.BLOCK,):
            raise CUDADriverError(f"{self.name}: {block} threads per block")
        table, rows, chunks = tensors._a.reshape(-1, 7), scalars._a.reshape(-1, MAX_ARGS), work._a
        chunks = chunks.reshape(-1, 2)
        if grid[0] > len(chunks) or grid[1] != 1:
            raise CUDADriverError(f"{self.name}: grid {grid} for {len(chunks)} blocks")
        LAUNCHES.append((self.name, grid, len(table)))
        op, k = self.op, len(self.op.states)
        for b in range(grid[0]):
            t, blk = int(chunks[b, 0]), int(chunks[b, 1])
            p, g, c0, c1, a0, a1, n = (int(x) for x in table[t])
            lo, hi = blk * blockwise.BLOCK, min((blk + 1) * blockwise.BLOCK, n)
            if not 0 <= lo < hi:
                raise CUDADriverError(f"{self.name}: block {b} = ({t}, {blk}) of {n} elements")
            if k == 1 and (c1 or a1):
                raise CUDADriverError(f"{self.name}: unused state pointers must be 0")
            blocks = -(-n // blockwise.BLOCK)
            codes = [resolve(c, n, np.uint8)[lo:hi] for c in (c0, c1)[:k]]
            absmax = [resolve(a, blocks, np.float32)[blk : blk + 1] for a in (a0, a1)[:k]]
            param = resolve(p, n, np.float32)[lo:hi]
            grad = widen(np, resolve(g, n, self.grad_dtype)[lo:hi])
            op.reference(param, grad, [*codes, *absmax], op.unpack(rows[t]))

    def _single(self, args: tuple) -> None:
        from stepd.kernels.ops import MAX_ARGS, MAX_SLOTS

        if len(args) != 3 + MAX_SLOTS + MAX_ARGS:
            raise CUDADriverError(f"{self.name}: {len(args)} arguments")
        p, g, *rest = args
        ptrs, n, scalars = rest[:MAX_SLOTS], int(rest[MAX_SLOTS]), rest[MAX_SLOTS + 1 :]
        for a, kind in ((p, np.float32), (g, self.grad_dtype)):
            if not isinstance(a, ndarray) or a.dtype != kind:
                raise CUDADriverError(f"{self.name}: expected a {np.dtype(kind)} device array")
        if not all(isinstance(s, np.float32) for s in scalars) or not isinstance(
            rest[MAX_SLOTS], np.int64
        ):
            raise CUDADriverError(f"{self.name}: scalars must be float32, n int64")
        row = np.array(scalars, np.float32)
        LAUNCHES.append((self.name, (1,), 1))
        self._apply(p.data.ptr, g.data.ptr, [int(x) for x in ptrs], n, 0, n, row)

    def _table(self, grid: tuple, args: tuple) -> None:
        """csrc/cuda.cu's chunked table launch: block b steps chunk b of ``chunks`` (tensor
        index, first element) over ``tensors`` rows, ``chunk`` elements at most."""
        from stepd.kernels.ops import MAX_ARGS, MAX_SLOTS

        if len(args) != 4:
            raise CUDADriverError(f"{self.name}: {len(args)} arguments, expected 4")
        tensors, chunks, scalars, chunk = args
        for a in (tensors, chunks, scalars):
            if not isinstance(a, ndarray):
                raise _unsupported(a)
        if tensors.dtype != np.int64 or chunks.dtype != np.int64 or scalars.dtype != np.float32:
            raise CUDADriverError(f"{self.name}: table dtypes")
        table = tensors._a.reshape(-1, 3 + MAX_SLOTS)
        work = chunks._a.reshape(-1, 2)
        rows = scalars._a.reshape(-1, MAX_ARGS)
        if grid[0] > len(work) or grid[1] != 1:
            raise CUDADriverError(f"{self.name}: grid {grid} for {len(work)} chunks")
        chunk = int(chunk)
        LAUNCHES.append((self.name, grid, len(table)))
        for b in range(grid[0]):  # what each block does
            k, lo = int(work[b, 0]), int(work[b, 1])
            p, g, *slots, n = (int(x) for x in table[k])
            hi = min(lo + chunk, n)
            if not 0 <= lo < hi:
                raise CUDADriverError(f"{self.name}: chunk {b} = ({k}, {lo}) of {n} elements")
            self._apply(p, g, slots, n, lo, hi, rows[k])

    def _apply(
        self, p: int, g: int, slots: list[int], n: int, lo: int, hi: int, row: np.ndarray
    ) -> None:
        from stepd.wire import widen

        op = self.op
        param = resolve(p, n, np.float32)[lo:hi]
        grad = widen(np, resolve(g, n, self.grad_dtype)[lo:hi])
        bufs = [resolve(s, n, np.float32)[lo:hi] for s in slots[: len(op.slots)]]
        if any(s != 0 for s in slots[len(op.slots) :]):
            raise CUDADriverError(f"{self.name}: unused slot pointers must be 0")
        op.reference(param, grad, bufs, op.unpack(row))


class ElementwiseKernel:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("the stand-in has no ElementwiseKernel")


def _load_real_environment() -> None:
    """``cupy._environment`` from the real CuPy (stdlib only): NVRTC's binding
    (``cupy_backends``, the real one) reads it to find its library."""
    here = str(Path(__file__).resolve().parent.parent)
    for entry in sys.path:
        if Path(entry or ".").resolve() == Path(here):
            continue
        candidate = Path(entry or ".") / "cupy" / "_environment.py"
        if candidate.is_file():
            spec = importlib.util.spec_from_file_location("cupy._environment", candidate)
            if spec is None or spec.loader is None:
                return
            module = importlib.util.module_from_spec(spec)
            sys.modules["cupy._environment"] = module
            spec.loader.exec_module(module)
            globals()["_environment"] = module
            return


_load_real_environment()
