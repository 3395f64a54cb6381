"""Safetensors files at disk speed: a checkpoint's bytes between its file and its arrays.

A save hands the kernel the arrays' own buffers, gathered into large ``os.writev`` calls (no
copy in Python, no small write per tensor). A load allocates each tensor's array and reads
its bytes straight into it (``os.preadv``), one chunk at a time; a tensor that must be
finite is screened on each chunk just read, while it is still in the cache, so validation
costs no second pass over memory (and no thread pool: the chunks are small). Both report
their progress in bytes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from stepd.wire import MAX_HEADER_BYTES, WireError, dump_parts, parse_header

# Large enough that a syscall's cost is nothing next to the bytes it moves, small enough that
# a chunk just read is still in L2 when the screen looks at it.
READ_CHUNK = 1 << 20
# A write this large keeps the disk busy; it is also the granularity of the progress report.
WRITE_CHUNK = 64 << 20
MAX_IOV = 1024  # IOV_MAX on Linux: buffers per writev
_F32 = np.dtype("<f4")

Progress = Callable[[int, int], None]  # called with the bytes moved so far, and of how many


def no_progress(done: int, total: int) -> None:
    pass


def write_file(
    path: os.PathLike[str] | str,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str],
    progress: Progress = no_progress,
) -> int:
    """Write ``tensors`` (the wire's safetensors layout) to a new file at ``path`` and fsync
    it. Returns the bytes written; ``progress`` hears of them as they go."""
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
) -> tuple[dict[str, np.ndarray], dict[str, str], set[str]]:
    """The tensors of the safetensors file open at ``fd`` (``size`` bytes), each in a new
    writable array of its own, with the file's ``__metadata__``; and the names of those
    tensors that ``finite`` asks to screen and that hold a NaN or an Inf.

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
    with _sequential(fd, start):
        tensors: dict[str, np.ndarray] = {}
        bad: set[str] = set()
        for spec in sorted(specs, key=lambda s: s.begin):  # in file order: one sweep
            arr = np.empty(spec.shape, spec.dtype)
            screen = spec.dtype == _F32 and finite(spec.name)
            if not _read_into(fd, arr, start + spec.begin, screen, step):
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
