"""Safetensors files at disk speed: a checkpoint's bytes between its file and its arrays.

A save hands the kernel the arrays' own buffers, gathered into large ``os.writev`` calls (no
copy in Python, no small write per tensor). A load allocates each tensor's array and reads
its bytes straight into it (``os.preadv``), one chunk at a time; a tensor that must be
finite is screened on each chunk just read, while it is still in the cache, so validation
costs no second pass over memory (and no thread pool: the chunks are small). Both report
their progress in bytes.

Device arrays (a CUDA store's) are streamed through one reused host staging buffer of at most
:data:`STAGING_BYTES`: a save copies each tensor (in pieces if larger) into it just before
those bytes are written, a load reads each piece into it, screens it and uploads it into the
tensor's new device array. Host memory then stays bounded by the staging size, whatever the
state's size; the file's bytes are the same as a host save's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from stepd.wire import (
    MAX_HEADER_BYTES,
    WireError,
    dump_header,
    dump_parts,
    file_dtype,
    header_entries,
    parse_header,
)

# Large enough that a syscall's cost is nothing next to the bytes it moves, small enough that
# a chunk just read is still in L2 when the screen looks at it.
READ_CHUNK = 1 << 20
# How far ahead of the read cursor the kernel is asked to fetch (WILLNEED): a cold file's
# next chunks are on their way while this one is screened, without holding the whole file in
# the page cache at once.
READ_AHEAD = 32 << 20
# A write this large keeps the disk busy; it is also the granularity of the progress report.
WRITE_CHUNK = 64 << 20
MAX_IOV = 1024  # IOV_MAX on Linux: buffers per writev
_F32 = np.dtype("<f4")
# The host buffer a device save or load stages its bytes through (reused from tensor to
# tensor): a save's writes are this large, and a module attribute so tests can shrink it.
STAGING_BYTES = 64 << 20

Progress = Callable[[int, int], None]  # called with the bytes moved so far, and of how many


def no_progress(done: int, total: int) -> None:
    pass


def write_file(
    path: os.PathLike[str] | str,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str],
    progress: Progress = no_progress,
) -> int:
    """Write ``tensors`` (the wire's safetensors layout) to a new file at ``path`` and fsync
    it. Returns the bytes written; ``progress`` hears of them as they go. Host arrays are
    written from their own buffers; if any tensor is a device array (one with ``.get``),
    every tensor goes through the staging buffer (:func:`_write_staged`)."""
    if not all(isinstance(a, np.ndarray) for a in tensors.values()):
        return _write_staged(path, tensors, metadata, progress)
    parts = [memoryview(p).cast("B") for p in dump_parts(tensors, metadata)]
    total = sum(len(p) for p in parts)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        done = 0
        progress(done, total)
        for batch in _batches(parts):
            done += _writev_all(fd, batch)
            progress(done, total)
        os.fsync(fd)
    finally:
        os.close(fd)
    return done


def _write_staged(
    path: os.PathLike[str] | str,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, str],
    progress: Progress,
) -> int:
    """:func:`write_file` for device arrays: the header is laid out from shapes and dtypes
    alone, then the staging buffer is filled tensor by tensor (a large one in pieces, small
    ones packed together), each piece copied to the host just before its bytes are written,
    and written out whenever it is full: host memory is the buffer's, not the state's."""
    flats = [  # a store's float32 and uint8 device arrays as they are: no device copy
        np.ascontiguousarray(a, file_dtype(a.dtype))
        if isinstance(a, np.ndarray)
        else a.astype(file_dtype(a.dtype), copy=False)
        for a in tensors.values()
    ]
    head = dump_header(
        header_entries([(n, a.dtype, tuple(a.shape)) for n, a in zip(tensors, flats, strict=True)]),
        metadata,
    )
    total = len(head) + sum(int(a.nbytes) for a in flats)
    # whole elements of any dtype fit (8 bytes at least); never more than the data needs
    staging = np.empty(max(8, min(STAGING_BYTES, total - len(head))), np.uint8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        done = fill = 0
        progress(done, total)
        done += _writev_all(fd, [memoryview(head)])
        progress(done, total)
        for a in flats:
            flat = a.reshape(-1)
            item, pos = flat.itemsize, 0
            while pos < flat.size:
                n = min((len(staging) - fill) // item, flat.size - pos)
                if n == 0:  # full (or too little room left for one element)
                    done += _writev_all(fd, [staging.data[:fill]])
                    progress(done, total)
                    fill = 0
                    continue
                out = staging[fill : fill + n * item].view(flat.dtype)
                if isinstance(flat, np.ndarray):
                    out[...] = flat[pos : pos + n]
                else:  # a blocking copy: the bytes are on the host when it returns
                    flat[pos : pos + n].get(out=out)
                fill += n * item
                pos += n
        if fill:
            done += _writev_all(fd, [staging.data[:fill]])
            progress(done, total)
        os.fsync(fd)
    finally:
        os.close(fd)
    return done


def _batches(parts: list[memoryview]) -> list[list[memoryview]]:
    """The parts as batches of about WRITE_CHUNK bytes: large ones sliced, small ones
    gathered (many small tensors are one writev, not one write each)."""
    batches: list[list[memoryview]] = [[]]
    room = WRITE_CHUNK
    for part in parts:
        while len(part):
            if room == 0 or len(batches[-1]) == MAX_IOV:
                batches.append([])
                room = WRITE_CHUNK
            piece, part = part[:room], part[room:]
            batches[-1].append(piece)
            room -= len(piece)
    return [b for b in batches if b]


def _writev_all(fd: int, buffers: list[memoryview]) -> int:
    """Write every buffer, going on after short writes; the bytes written."""
    done, first = 0, 0
    while first < len(buffers):
        n = os.writev(fd, buffers[first : first + MAX_IOV])
        if n <= 0:  # a regular file takes something or raises (ENOSPC): never loop on 0
            raise OSError(errno.EIO, "write made no progress")
        done += n
        while first < len(buffers) and n >= len(buffers[first]):
            n -= len(buffers[first])
            first += 1
        if n:  # a short write ended inside this buffer
            buffers[first] = buffers[first][n:]
    return done


def read_file(
    fd: int,
    size: int,
    finite: Callable[[str], bool] = lambda name: False,
    progress: Progress = no_progress,
    codes: tuple[str, ...] = ("F32",),
    xp: Any = np,
) -> tuple[dict[str, Any], dict[str, str], set[str]]:
    """The tensors of the safetensors file open at ``fd`` (``size`` bytes), each in a new
    writable array of its own, with the file's ``__metadata__``; and the names of those
    tensors that ``finite`` asks to screen and that hold a NaN or an Inf.

    ``xp`` other than NumPy (CuPy, on the caller's current stream): each tensor is a new
    device array, its bytes read piece by piece into one reused host staging buffer
    (:data:`STAGING_BYTES`), screened there and uploaded: host memory stays bounded by the
    buffer whatever the file's size. An allocation failure on the device propagates; the
    arrays made so far are dropped with it.

    ``WireError`` for a file that is not what its header says; ``EOFError`` if it ends
    sooner than its size (it changed while being read)."""
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise WireError("safetensors: file shorter than its 8-byte header length")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > min(size - 8, MAX_HEADER_BYTES):
        raise WireError(f"safetensors: header length {header_len} beyond the file or the limit")
    raw = os.pread(fd, header_len, 8)
    if len(raw) != header_len:
        raise EOFError
    start = 8 + header_len
    specs, metadata = parse_header(raw, size - start, codes)
    moved = start

    def step(n: int) -> None:
        nonlocal moved
        moved += n
        progress(moved, size)

    progress(moved, size)
    staging = None
    if xp is not np:
        data = sum(s.end - s.begin for s in specs)
        staging = np.empty(max(8, min(STAGING_BYTES, data)), np.uint8)
    with _sequential(fd, start):
        os.posix_fadvise(fd, start, READ_AHEAD, os.POSIX_FADV_WILLNEED)
        tensors: dict[str, Any] = {}
        bad: set[str] = set()
        for spec in sorted(specs, key=lambda s: s.begin):  # in file order: one sweep
            screen = spec.dtype == _F32 and finite(spec.name)
            if staging is None:
                arr = np.empty(spec.shape, spec.dtype)
                ok = _read_into(fd, arr, start + spec.begin, screen, step)
            else:
                arr = xp.empty(spec.shape, spec.dtype)
                ok = _upload(fd, arr, start + spec.begin, screen, step, staging, xp)
            if not ok:
                bad.add(spec.name)
            tensors[spec.name] = arr
    return {s.name: tensors[s.name] for s in specs}, metadata, bad


@contextlib.contextmanager
def _sequential(fd: int, start: int) -> Iterator[None]:
    """Tell the kernel the file is read once, front to back: a larger read-ahead."""
    os.posix_fadvise(fd, start, 0, os.POSIX_FADV_SEQUENTIAL)
    try:
        yield
    finally:
        os.posix_fadvise(fd, start, 0, os.POSIX_FADV_NORMAL)


def _upload(
    fd: int,
    arr: Any,
    offset: int,
    screen: bool,
    progress: Callable[[int], None],
    staging: np.ndarray,
    xp: Any,
) -> bool:
    """Fill the device array ``arr`` from ``offset`` through ``staging``, a piece at a time;
    False if ``screen`` found a non-finite value."""
    flat = arr.reshape(-1)
    per = len(staging) // flat.itemsize
    stream = xp.cuda.get_current_stream()
    finite = True
    for first in range(0, flat.size, per):
        n = min(per, flat.size - first)
        host = staging[: n * flat.itemsize].view(flat.dtype)
        finite = _read_into(fd, host, offset + first * flat.itemsize, screen, progress) and finite
        flat[first : first + n].set(host, stream=stream)
        stream.synchronize()  # the next piece reuses the buffer this copy reads
    return finite


def _read_into(
    fd: int, arr: np.ndarray, offset: int, screen: bool, progress: Callable[[int], None]
) -> bool:
    """Fill ``arr`` from ``offset``; False if ``screen`` found a non-finite value."""
    flat = arr.reshape(-1)
    view = flat.data.cast("B") if flat.size else memoryview(b"")
    # +1: a short read may leave an element split, screened with the next chunk
    mask = np.empty(READ_CHUNK // flat.itemsize + 1, bool) if screen else None
    finite = True
    done = checked = 0  # bytes read, elements screened
    while done < len(view):
        os.posix_fadvise(fd, offset + done + READ_AHEAD, READ_CHUNK, os.POSIX_FADV_WILLNEED)
        n = os.preadv(fd, [view[done : done + READ_CHUNK]], offset + done)
        if n <= 0:
            raise EOFError
        done += n
        if mask is not None:
            upto = done // flat.itemsize
            out = mask[: upto - checked]
            np.isfinite(flat[checked:upto], out=out)
            finite = finite and bool(out.all())
            checked = upto
        progress(n)
    return finite
