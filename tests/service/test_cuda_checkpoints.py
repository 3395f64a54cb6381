"""A CUDA store's checkpoints are streamed: a save copies each device array to the host a
staging buffer at a time just before its bytes are written, a restore uploads each tensor a
staging buffer at a time as it is read; neither holds the state in host memory. Checked on
the CuPy stand-in (tests/support/fakecupy), which counts the bytes of every copy between
host and device: host/device handling only, NOT a GPU run."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest
from stepd.service import tensorfile
from stepd.service.checkpoints import CheckpointDir
from stepd.service.errors import Invalid
from stepd.service.store import ParamStore
from stepd.service.tensorfile import write_file

STAGING = 4096  # bytes: far less than the state below


def _cpu_store() -> ParamStore:
    rng = np.random.default_rng(11)
    store = ParamStore("cpu")
    store.register("w", (50, 61), rng.standard_normal((50, 61)).astype(np.float32), "adamw", {})
    store.register("q", (3001,), rng.standard_normal(3001).astype(np.float32), "adamw8bit", {})
    store.register("b", (7,), None, "sgd", {"momentum": 0.9})
    for _ in range(2):
        store.step({n: rng.standard_normal(store.entry(n).shape).astype(np.float32) for n in "wqb"})
        store.end_iteration()
    return store


def _state(store: ParamStore) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Host copies of everything and the metadata: what a failed restore must not change."""
    return store.write_snapshot(lambda t, m: ({k: np.array(v) for k, v in t.items()}, m))


def _assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert a[1] == b[1]
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k], err_msg=k)


def _save(store: ParamStore, ckpts: CheckpointDir, name: str) -> None:
    store.write_snapshot(lambda t, m: ckpts.save(t, m, name), device=True)  # as the engine


def _restore(store: ParamStore, ckpts: CheckpointDir, name: str) -> None:
    with store.device_stream:  # as the engine
        tensors, meta, _ = ckpts.load_info(name, xp=store.xp)
    store.restore(tensors, meta, fresh=True)


@pytest.fixture
def small_staging(monkeypatch) -> int:
    monkeypatch.setattr(tensorfile, "STAGING_BYTES", STAGING)
    return STAGING


def test_a_cuda_round_trip_streams_through_the_staging_buffer_bit_for_bit(
    fake_cupy, small_staging, tmp_path
) -> None:
    ckpts = CheckpointDir(tmp_path)
    cpu = _cpu_store()
    _save(cpu, ckpts, "cpu")  # the CPU path: straight from the arrays
    data = ckpts.path("cpu").stat().st_size
    gpu = ParamStore("cuda")
    fake_cupy.TO_DEVICE.clear()
    _restore(gpu, ckpts, "cpu")
    assert max(fake_cupy.TO_DEVICE) <= small_staging
    # every byte crossed once, as the load read it: the restore kept the uploaded arrays
    assert data - 8 - _header_len(ckpts, "cpu") == sum(fake_cupy.TO_DEVICE)
    assert isinstance(gpu.entry("w").param, fake_cupy.ndarray)
    _assert_same(_state(gpu), _state(cpu))

    fake_cupy.TO_HOST.clear()
    _save(gpu, ckpts, "gpu")
    assert max(fake_cupy.TO_HOST) <= small_staging
    assert sum(fake_cupy.TO_HOST) == sum(fake_cupy.TO_DEVICE)  # each byte copied once
    assert ckpts.path("gpu").read_bytes() == ckpts.path("cpu").read_bytes()


def test_the_streamed_writes_stay_within_the_staging_buffer(
    fake_cupy, small_staging, tmp_path, monkeypatch
) -> None:
    ckpts = CheckpointDir(tmp_path)
    gpu = ParamStore("cuda")
    _save(_cpu_store(), ckpts, "cpu")
    _restore(gpu, ckpts, "cpu")
    sizes: list[int] = []
    real = os.writev

    def writev(fd: int, buffers: Any) -> int:
        sizes.append(sum(len(memoryview(b)) for b in buffers))
        return real(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)
    _save(gpu, ckpts, "gpu")
    assert len(sizes) > 5  # the state is many staging buffers
    assert max(sizes[1:]) <= small_staging  # all but the header


def test_a_bad_file_changes_nothing_on_a_cuda_store(fake_cupy, small_staging, tmp_path) -> None:
    ckpts = CheckpointDir(tmp_path)
    cpu = _cpu_store()
    _save(cpu, ckpts, "good")
    tensors, meta, _ = ckpts.load_info("good")
    gpu = ParamStore("cuda")
    _restore(gpu, ckpts, "good")
    gpu.step({"w": np.ones((50, 61), np.float32)})
    before = _state(gpu)

    nan = dict(tensors)
    nan["param/b"] = tensors["param/b"].copy()
    nan["param/b"][-1] = np.nan  # after other tensors were uploaded
    write_file(ckpts.path("nan"), nan, {"stepd": json.dumps(meta)})
    wrong = {**meta, "params": {**meta["params"], "w": {**meta["params"]["w"], "shape": [61, 50]}}}
    write_file(ckpts.path("shape"), tensors, {"stepd": json.dumps(wrong)})
    torn = ckpts.path("good").read_bytes()
    ckpts.path("torn").write_bytes(torn[:-100])
    for name, match in (("nan", "non-finite"), ("shape", "must be float32"), ("torn", "malformed")):
        with pytest.raises(Invalid, match=match):
            _restore(gpu, ckpts, name)
        _assert_same(_state(gpu), before)

    made: list[int] = []
    real_empty = fake_cupy.empty

    def empty(*args: Any, **kwargs: Any) -> Any:  # the device fills up part way through
        made.append(1)
        if len(made) > 3:
            raise MemoryError("out of device memory")
        return real_empty(*args, **kwargs)

    fake_cupy.empty = empty
    try:
        with pytest.raises(MemoryError):
            _restore(gpu, ckpts, "good")
    finally:
        del fake_cupy.empty  # back to the module's own
    _assert_same(_state(gpu), before)
    _restore(gpu, ckpts, "good")  # and a restore that fits still works
    _assert_same(_state(gpu), _state(cpu))


def _header_len(ckpts: CheckpointDir, name: str) -> int:
    return int.from_bytes(ckpts.path(name).read_bytes()[:8], "little")
