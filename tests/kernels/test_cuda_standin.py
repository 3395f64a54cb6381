"""The CUDA backend's Python side on the CuPy stand-in (tests/support/fakecupy).

These prove host/device handling, the NVRTC build the backend loads and the layout of its
launch tables (every element of every tensor stepped exactly once, bit-identical to the
NumPy reference). They are NOT GPU runs: the kernels' CUDA arithmetic runs only on a device
(tests/kernels/test_cuda.py, bench/gpu_check.py).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from stepd.kernels import create_optimizer, get_backend
from stepd.kernels.algorithms import adafactor
from stepd.kernels.backends import cuda

from stepd.wire import narrow
from tests.kernels import gpu


def test_the_stand_in_enforces_the_device_rules(fake_cupy) -> None:
    cp = fake_cupy
    host = np.arange(6, dtype=np.float32)
    dev = cp.asarray(host)
    with pytest.raises(TypeError, match=r"Unsupported type <class 'numpy.ndarray'>"):
        cp.isfinite(host)
    with pytest.raises(TypeError, match="Unsupported type"):
        dev + host
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(dev)
    total = dev.sum()
    assert isinstance(total, cp.ndarray)
    assert total.shape == ()
    assert float(total) == 15.0
    assert not hasattr(dev.flags, "writeable")
    assert isinstance(dev.get(), np.ndarray)
    with pytest.raises(ValueError, match="not inside a live allocation"):
        cp.resolve(12345, 4, np.float32)


def test_all_finite_takes_host_and_device_arrays(fake_cupy) -> None:
    backend = get_backend("cuda")
    good = np.linspace(-3, 3, 50, dtype=np.float32)
    bad = good.copy()
    bad[7] = np.inf
    for arr, want in ((good, True), (bad, False)):
        for x in (arr, narrow(np, arr, np.dtype(np.float16)), narrow(np, arr, np.dtype(np.uint16))):
            assert backend.all_finite(x) is want  # a host array, as a request delivers it
            assert backend.all_finite(fake_cupy.asarray(x)) is want


@pytest.mark.parametrize("algorithm", ["adamw", "sgd", "lion"])
def test_chunked_launch_steps_every_element_once(fake_cupy, monkeypatch, algorithm) -> None:
    """One large tensor, many small ones and empty ones, with float32, bfloat16 and float16
    gradients, in one step_batch: bit-identical to the reference backend."""
    monkeypatch.setattr(cuda, "CHUNK", 64)  # several chunks per tensor, quickly
    cp = fake_cupy
    rng = np.random.default_rng(3)
    sizes = [64 * 5 + 7, 0, *rng.integers(1, 70, 40).tolist(), 0, 64, 65, 1]
    host = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    dev = [cp.asarray(p) for p in host]
    ref = create_optimizer(algorithm, backend="reference", lr=1e-2)
    gpu_opt = create_optimizer(algorithm, backend="cuda", lr=1e-2)
    dtypes = [np.dtype(np.float32), np.dtype(np.uint16), np.dtype(np.float16)]
    del cp.LAUNCHES[:]
    for _ in range(3):
        grads = [
            narrow(np, rng.standard_normal(n).astype(np.float32), dtypes[i % 3])
            for i, n in enumerate(sizes)
        ]
        ref.step_batch(
            [
                (f"p{i}", (n,), p, g)
                for i, (n, p, g) in enumerate(zip(sizes, host, grads, strict=True))
            ]
        )
        gpu_opt.step_batch(
            [
                (f"p{i}", (n,), d, cp.asarray(g))
                for i, (n, d, g) in enumerate(zip(sizes, dev, grads, strict=True))
            ]
        )
        ref.end_iteration()
        gpu_opt.end_iteration()
    for i, (h, d) in enumerate(zip(host, dev, strict=True)):
        assert d.get().tobytes() == h.tobytes(), f"p{i}"
    chunks = sum(-(-n // 64) for i, n in enumerate(sizes))
    grids = [grid[0] for name, grid, _ in cp.LAUNCHES if "_multi" in name]
    assert sum(grids) == 3 * chunks  # one block per chunk, none for an empty tensor


def test_chunk_table() -> None:
    table = cuda.chunk_table(np.array([5, 0, 2, 4], np.int64), 2)
    assert table.tolist() == [[0, 0], [0, 2], [0, 4], [2, 0], [3, 0], [3, 2]]
    assert cuda.chunk_table(np.array([0, 0], np.int64), 2).shape == (0, 2)


def test_the_backend_loads_its_own_nvrtc_build(fake_cupy) -> None:
    module = cuda._module()
    assert set(cuda.entry_points()) <= module.entries
    with pytest.raises(RuntimeError, match="ftz"):  # CuPy's own compile is never used
        fake_cupy.RawModule(code='extern "C" __global__ void k() {}')


def test_auto_takes_cuda_only_after_its_self_test(fake_cupy, caplog) -> None:
    from stepd.service.app import pick_device

    assert pick_device("auto") == "cuda"
    fake_cupy.PROBE_FAILS.append("CUDA_ERROR_LAUNCH_FAILED (from the test)")
    with caplog.at_level(logging.INFO, logger="stepd"):
        assert pick_device("auto") == "cpu"
    assert "CUDA_ERROR_LAUNCH_FAILED" in caplog.text
    fake_cupy.PROBE_FAILS.append("CUDA_ERROR_LAUNCH_FAILED (from the test)")
    with pytest.raises(RuntimeError, match="--device cuda"):
        pick_device("cuda")
    del fake_cupy.PROBE_FAILS[:]


def test_soap_retries_a_silent_eigh_failure_in_float64(fake_cupy) -> None:
    cp = fake_cupy
    rng = np.random.default_rng(5)
    param = cp.asarray(rng.standard_normal((6, 4)).astype(np.float32))
    opt = create_optimizer("soap", backend="cuda", lr=1e-2, precondition_frequency=2)
    cp.poison_linalg("eigh", calls=2)  # both factors' float32 eigh fail, silently
    cp.poison_linalg("qr", calls=1)
    for _ in range(4):
        grad = cp.asarray(rng.standard_normal((6, 4)).astype(np.float32))
        opt.step("w", (6, 4), param, grad)
        opt.end_iteration()
    assert cp._POISON == {"eigh": 0, "qr": 0}  # the failures did happen
    for slot in opt.state("w").slots.values():
        assert bool(cp.isfinite(slot).all())
    assert bool(cp.isfinite(param).all())


def test_require_gpu_refuses_the_stand_in(fake_cupy, monkeypatch) -> None:
    monkeypatch.setattr(gpu, "REQUIRE_GPU", True)
    with pytest.raises(pytest.fail.Exception, match="not a GPU"):
        gpu.cuda_or_skip()


def test_require_gpu_turns_a_skip_into_a_failure(monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_cupy(name, *args, **kwargs):
        if name == "cupy":
            raise ImportError("no cupy (from the test)")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cupy)
    monkeypatch.setattr(gpu, "REQUIRE_GPU", True)
    with pytest.raises(pytest.fail.Exception, match="STEPD_REQUIRE_GPU=1"):
        gpu.cuda_or_skip()
    monkeypatch.setattr(gpu, "REQUIRE_GPU", False)
    with pytest.raises(pytest.skip.Exception):
        gpu.cuda_or_skip()


def test_adafactor_rms_sums_large_tensors_in_chunks(monkeypatch) -> None:
    """2^31+ elements overflow a BLAS length: the RMS is summed in chunks (here of 7)."""
    x = np.random.default_rng(2).standard_normal(50).astype(np.float32)
    lengths: list[int] = []

    class Spy:
        def __getattr__(self, name):
            return getattr(np, name)

        def dot(self, a, b):
            lengths.append(a.size)
            return np.dot(a, b)

    monkeypatch.setattr(adafactor, "_DOT_CHUNK", 7)
    got = adafactor._rms(Spy(), x)
    assert lengths == [7] * 7 + [1]
    assert got == pytest.approx(float(np.sqrt(np.mean(x.astype(np.float64) ** 2))), rel=1e-6)
    monkeypatch.setattr(adafactor, "_DOT_CHUNK", 50)
    lengths.clear()
    assert adafactor._rms(Spy(), x) == adafactor._rms(np, x)  # one chunk: unchanged
    assert lengths == [50]
