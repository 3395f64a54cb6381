"""Shared-memory segments on huge pages (``stepd.hugepages``): the page mode a mapping
reports is what the kernel's page tables show, and every fallback keeps the bytes."""

from __future__ import annotations

import fcntl
import mmap
import os
import re
from pathlib import Path

import numpy as np
import pytest

from stepd import hugepages

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
MB = 1 << 20
pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd_create")


def pmd_kb(label: str, pid: int | str = "self") -> int:
    """kB of the memory file ``label`` that process ``pid`` maps with 2 MiB entries."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.endswith(f"/memfd:{label}") or f"/memfd:{label} " in line
        elif inside and line.startswith(("ShmemPmdMapped:", "FilePmdMapped:")):
            total += int(line.split()[1])
    return total


def test_a_segment_reports_the_pages_it_got(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STEPD_HUGE_PAGES", raising=False)
    nbytes = 8 * MB
    fd, seg = hugepages.create_segment("stepd-hp-a", nbytes, SEALS)
    try:
        data = np.frombuffer(seg.mm, np.float32, nbytes // 4, seg.offset)
        data[:] = np.arange(nbytes // 4, dtype=np.float32)
        # the client's view: thp means its page tables hold 2 MiB entries
        if seg.pages == hugepages.THP:
            assert pmd_kb("stepd-hp-a") == nbytes // 1024
        elif seg.pages == hugepages.SMALL:
            assert pmd_kb("stepd-hp-a") == 0
        # a second mapping (the server's) sees the same bytes, huge when the file is
        other = hugepages.map_segment(fd, nbytes)
        assert hugepages.collapse(other, nbytes) == seg.pages
        view = np.frombuffer(other.mm, np.float32, nbytes // 4, other.offset)
        np.testing.assert_array_equal(view, np.arange(nbytes // 4, dtype=np.float32))
        view[7] = -1.0
        assert data[7] == -1.0
        if seg.pages == hugepages.THP:
            assert pmd_kb("stepd-hp-a") == 2 * nbytes // 1024
        # mmap still tracks the views: no unmapping under a live array
        with pytest.raises(BufferError):
            other.mm.close()
        del view
        other.mm.close()
    finally:
        del data
        seg.mm.close()
        os.close(fd)


def test_collapse_keeps_what_small_pages_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """A segment written on 4 KiB pages (an older client) is collapsed by the server's
    mapping with its contents intact; only whole 2 MiB extents, the tail stays."""
    monkeypatch.delenv("STEPD_HUGE_PAGES", raising=False)
    nbytes = 5 * MB + 4096
    fd = os.memfd_create("stepd-hp-b", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, nbytes)
        plain = mmap.mmap(fd, nbytes)
        want = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
        np.frombuffer(plain, np.uint8)[:] = want
        seg = hugepages.map_segment(fd, nbytes)
        pages = hugepages.collapse(seg, nbytes)
        got = np.frombuffer(seg.mm, np.uint8, nbytes, seg.offset)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(np.frombuffer(plain, np.uint8), want)
        if pages == hugepages.THP:
            assert pmd_kb("stepd-hp-b") == 4 * MB // 1024  # two whole extents, ours only
        else:
            assert pages == hugepages.SMALL
            assert pmd_kb("stepd-hp-b") == 0
        del got
        seg.mm.close()
        plain.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize("nbytes", [4096, 2 * MB - 8])
def test_small_segments_and_off_take_plain_pages(
    monkeypatch: pytest.MonkeyPatch, nbytes: int
) -> None:
    for setting in ("auto", "off"):
        monkeypatch.setenv("STEPD_HUGE_PAGES", setting)
        size = nbytes if setting == "auto" else 8 * MB
        fd, seg = hugepages.create_segment("stepd-hp-c", size, SEALS)
        try:
            assert (seg.pages, seg.offset, len(seg.mm)) == (hugepages.SMALL, 0, size)
            assert hugepages.collapse(seg, size) == hugepages.SMALL
            assert pmd_kb("stepd-hp-c") == 0
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        finally:
            seg.mm.close()
            os.close(fd)
