"""Huge pages for the shared-memory segments of shm://, where the host allows them.

A fused step streams its buffers once; on 4 KiB pages it takes a TLB miss every 4 KiB and the
hardware prefetchers stop at every page boundary, while NumPy's own large arrays get 2 MiB
transparent huge pages (it asks with ``MADV_HUGEPAGE``). Memory files (``memfd_create``) are
shmem, which many hosts keep off huge pages (``shmem_enabled`` ``never``). A segment's *page
mode* is one of:

- ``thp``: the memfd is mapped at a huge-page-aligned address and its pages collapsed into
  transparent huge pages with ``MADV_COLLAPSE`` (Linux >= 6.1). The collapse ignores the
  ``never`` setting (only ``deny`` refuses it), and a file whose pages are huge is mapped
  with 2 MiB entries in every process that maps it aligned: client and server alike.
- ``4k``: ordinary pages, as before; also what ``STEPD_HUGE_PAGES=off`` asks for.

Not hugetlbfs (``MFD_HUGETLB``), even where huge pages are reserved: its pages cannot be
sealed in place, and a client that punches a hole in one (``fallocate``) when the pool is
empty makes the server's next touch of that page a SIGBUS. The server refuses such files
(:func:`is_hugetlb`); a hole in a shmem file just reads back as zeros.

A mapping is a Python ``mmap`` reservation one huge page larger than the file, with the file
mapped over its aligned interior (``MAP_FIXED``): the ``mmap`` object still tracks exported
buffers (``close`` refuses while a view is alive) and unmaps everything when closed.
Every step here falls back to the plain mapping on any error.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HUGE_PAGE",
    "SMALL",
    "THP",
    "Mapped",
    "collapse",
    "create_segment",
    "enabled",
    "is_hugetlb",
    "map_segment",
]

THP, SMALL = "thp", "4k"
_MADV_COLLAPSE = getattr(mmap, "MADV_COLLAPSE", 25)  # Linux 6.1; Python 3.11 lacks the name
_MAP_FIXED = 0x10
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
_HUGETLBFS_MAGIC = 0x958458F6


def _pmd_size() -> int:
    try:
        return int(Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


HUGE_PAGE = _pmd_size()


def enabled() -> bool:
    """False when ``STEPD_HUGE_PAGES=off`` (read on every call: a benchmark flips it)."""
    return os.environ.get("STEPD_HUGE_PAGES", "auto").lower() not in ("off", "0", "false", "no")


@dataclass
class Mapped:
    """A segment's mapping: the file's byte 0 is at ``offset`` in ``mm``."""

    mm: mmap.mmap
    offset: int
    pages: str  # THP or SMALL


def create_segment(label: str, nbytes: int, seals: int) -> tuple[int, Mapped]:
    """A new memory file of ``nbytes``, sealed with ``seals`` and mapped: the descriptor (the
    caller closes it) and the mapping, on huge pages where the host allows."""
    import fcntl

    fd = os.memfd_create(label, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        mapped = map_segment(fd, nbytes)
        collapse(mapped, nbytes)
    except BaseException:
        os.close(fd)
        raise
    return fd, mapped


def is_hugetlb(fd: int) -> bool:
    """Whether ``fd`` is a file on hugetlbfs (``fstatfs``; its ``st_blksize`` does not tell:
    a shmem file reports 2 MiB where shmem THP is on)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type comes first
    if _libc().fstatfs(fd, buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF == _HUGETLBFS_MAGIC


def map_segment(fd: int, nbytes: int) -> Mapped:
    """Map a memory file read-write and shared, at a huge-page-aligned address when it spans
    one; allocates nothing (the pages wait for :func:`collapse`)."""
    if enabled() and nbytes >= HUGE_PAGE:
        with contextlib.suppress(OSError):
            return _aligned(fd, nbytes)
    return Mapped(mmap.mmap(fd, nbytes), 0, SMALL)


def collapse(mapped: Mapped, nbytes: int) -> str:
    """Put the first ``nbytes`` of an aligned mapping's file on transparent huge pages
    (whole 2 MiB extents; the tail keeps small pages); returns the page mode. Only reads
    touch the file: the server runs this on its clients' memory, after the registration
    that uses those bytes passed the budget (it allocates them)."""
    whole = nbytes // HUGE_PAGE * HUGE_PAGE
    if mapped.pages != SMALL or not enabled() or whole == 0:
        return mapped.pages
    mm, at = mapped.mm, mapped.offset
    if (ctypes.addressof(ctypes.c_char.from_buffer(mm)) + at) % HUGE_PAGE:
        return mapped.pages  # a plain mapping the kernel placed unaligned
    try:
        mm.madvise(mmap.MADV_HUGEPAGE, at, whole)  # later faults huge where shmem allows
        # The collapse wants a page present in each extent: a read allocates one.
        for k in range(at, at + whole, HUGE_PAGE):
            mm[k]
        mm.madvise(_MADV_COLLAPSE, at, whole)
    except OSError:  # EINVAL (no THP here, or "deny"), EAGAIN / ENOMEM (none to be had)
        return mapped.pages
    mapped.pages = THP
    return THP


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
    libc.mmap.argtypes += [ctypes.c_int, ctypes.c_long]
    libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
    return libc


def _aligned(fd: int, nbytes: int) -> Mapped:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=flags)
    try:
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        offset = -base % HUGE_PAGE
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        got = _libc().mmap(base + offset, nbytes, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
        if got != base + offset:
            raise OSError(ctypes.get_errno(), "mmap MAP_FIXED failed")
    except BaseException:
        mm.close()
        raise
    return Mapped(mm, offset, SMALL)
