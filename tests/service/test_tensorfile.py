"""Checkpoint files at disk speed: large writes straight from the arrays, reads straight into
new arrays with the NaN/Inf screen on each chunk read, and what progress they report."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from stepd.service import tensorfile
from stepd.service.checkpoints import CheckpointDir
from stepd.service.errors import Invalid
from stepd.service.store import ParamStore
from stepd.service.tensorfile import read_file, write_file

from stepd.wire import WireError, parse


def tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    big = (tensorfile.READ_CHUNK * 3) // 4 + 5  # spans chunks, and not a whole number of them
    return {
        "param/big": rng.standard_normal(big, np.float32),
        "state/big/exp_avg": rng.standard_normal((3, 7), np.float32),
        "param/empty": np.zeros((0, 4), np.float32),
        "param/scalar": np.float32(2.5).reshape(()),
        "param/strided": rng.standard_normal((6, 8), np.float32)[:, ::2],  # not contiguous
    }


def read(path: Path, **kw):
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_file(fd, os.fstat(fd).st_size, **kw)
    finally:
        os.close(fd)


def test_a_file_written_reads_back_bit_for_bit_as_writable_arrays_of_their_own(tmp_path) -> None:
    src = tensors(np.random.default_rng(0))
    path = tmp_path / "a.safetensors"
    size = write_file(path, src, {"k": "v"})
    assert size == path.stat().st_size
    got, meta, bad = read(path)
    assert meta == {"k": "v"}
    assert bad == set()
    assert list(got) == list(src)  # header order
    for name, want in src.items():
        np.testing.assert_array_equal(got[name], want)
        assert got[name].flags.writeable
        assert got[name].flags.owndata
    # the wire's own parser reads the same bytes the same way
    parsed, _ = parse(path.read_bytes())
    for name, want in src.items():
        np.testing.assert_array_equal(parsed[name], want)


def test_small_tensors_are_gathered_into_few_writes_and_short_writes_go_on(
    tmp_path, monkeypatch
) -> None:
    calls = []
    real = os.writev

    def short_writev(fd, buffers):  # the kernel may take less than it was given
        calls.append(len(buffers))
        head = memoryview(buffers[0])[:1000]
        return real(fd, [head])

    src = {f"state/w{i}/m": np.full(10, i, np.float32) for i in range(500)}
    monkeypatch.setattr(os, "writev", short_writev)
    write_file(tmp_path / "s.safetensors", src, {})
    monkeypatch.setattr(os, "writev", real)
    got, _, _ = read(tmp_path / "s.safetensors")
    assert all(np.array_equal(got[k], v) for k, v in src.items())
    # 500 tensors of 40 bytes: the first writev carries all of them (and the header)
    assert calls[0] == 501


def test_the_screen_finds_a_nan_in_any_chunk_of_a_screened_tensor_only(
    tmp_path, monkeypatch
) -> None:
    src = tensors(np.random.default_rng(1))
    src["param/big"][-3] = np.nan  # in the last chunk
    src["state/big/exp_avg"][1, 2] = np.inf  # not screened: only what ``finite`` names
    path = tmp_path / "n.safetensors"
    write_file(path, src, {})
    finite = lambda name: name.startswith("param/")  # noqa: E731
    assert read(path, finite=finite)[2] == {"param/big"}

    real = os.preadv

    def odd_reads(fd, buffers, offset):  # short reads that split elements
        return real(fd, [memoryview(buffers[0])[:4097]], offset)

    monkeypatch.setattr(os, "preadv", odd_reads)
    got, _, bad = read(path, finite=finite)
    assert bad == {"param/big"}
    np.testing.assert_array_equal(got["param/big"], src["param/big"])
    src["param/big"][-3] = 1.0
    write_file(path, src, {})
    assert read(path, finite=finite)[2] == set()


def test_a_file_shorter_than_it_was_is_an_error_not_zeros(tmp_path) -> None:
    path = tmp_path / "t.safetensors"
    write_file(path, tensors(np.random.default_rng(2)), {})
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        os.truncate(fd, size - 100)  # after the size was taken: it changed while being read
        with pytest.raises(EOFError):
            read_file(fd, size)
        with pytest.raises(WireError):  # the header describes more than the file holds
            read_file(fd, size - 100)
    finally:
        os.close(fd)


def test_progress_rises_to_the_total_on_both_sides(tmp_path) -> None:
    src = tensors(np.random.default_rng(3))
    path = tmp_path / "p.safetensors"
    seen: list[tuple[int, int]] = []
    size = write_file(path, src, {}, lambda done, total: seen.append((done, total)))
    assert seen[-1] == (size, size)
    assert seen == sorted(seen)
    seen.clear()
    read(path, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (size, size)
    assert seen == sorted(seen)
    assert len(seen) > 2  # per chunk, not once


def small_store() -> ParamStore:
    store = ParamStore("cpu")
    store.register("w", (1000,), np.ones(1000, np.float32), "adamw", {})
    store.step({"w": np.full(1000, 0.5, np.float32)})
    return store


def test_a_checkpoint_reports_its_activity_while_saved_and_restored(tmp_path) -> None:
    store = small_store()
    ckpts = CheckpointDir(tmp_path)
    seen = []

    def watch(done: int, total: int) -> None:
        a = ckpts.activity
        assert a is not None
        seen.append((a.action, a.name, a.done, a.total))

    info = store.write_snapshot(lambda t, m: ckpts.save(t, m, "c1", watch))
    assert seen[-1] == ("save", "c1", info.bytes, info.bytes)
    assert ckpts.activity is None
    seen.clear()
    _tensors, _meta, _ = ckpts.load_info("c1", watch)
    assert seen[-1] == ("restore", "c1", info.bytes, info.bytes)
    assert ckpts.activity is None


def test_a_restore_keeps_the_arrays_it_read_and_refuses_a_non_finite_param(tmp_path) -> None:
    store = small_store()
    ckpts = CheckpointDir(tmp_path)
    store.write_snapshot(lambda t, m: ckpts.save(t, m, "good"))
    before = store.read("w")
    tensors, meta, _ = ckpts.load_info("good")
    store.restore(tensors, meta, fresh=True)
    # the parameter and its state are the arrays read from the file (no second copy)
    assert np.shares_memory(store.entry("w").param, tensors["param/w"])
    assert np.shares_memory(store.slots("w")["exp_avg"], tensors["state/w/exp_avg"])
    np.testing.assert_array_equal(store.read("w"), before)
    store.step({"w": np.full(1000, 0.5, np.float32)})  # and they step
    assert not np.array_equal(store.read("w"), before)

    bad = {"param/w": np.array([1.0, np.nan], np.float32)}
    store.write_snapshot(lambda t, m: ckpts.save(bad, {**m, "params": {}}, "nan"))
    with pytest.raises(Invalid, match="'param/w' has non-finite values"):
        ckpts.load_info("nan")
