"""The GPU check: everything about the CUDA path that only a real device can show.

    python bench/gpu_check.py [--out gpu_check.json] [--skip-pytest] [--skip-large]

Runs in about ten minutes on one H200 (most of it the 2^31-element tensors) and writes a
JSON summary (one entry per check: ok, seconds, details) to ``--out``; exits 1 if any check
failed. The checks:

1. ``build``: the module compiles (NVRTC, the device's arch) and loads; every entry point
   resolves; the backend's start-up self-test passes (subnormals kept).
2. ``pytest_gpu``: ``pytest -m gpu`` with ``STEPD_REQUIRE_GPU=1`` (a skip is a failure).
3. ``subnormals``: CPU vs GPU steps on subnormal params, gradients and state, bit for bit.
4. ``large_sgd`` / ``large_adafactor``: one tensor of 2^31 + 1000 elements (32-bit index and
   BLAS-length overflows): finite, and SGD exact against a host computation at samples.
5. ``many_tensors``: 66 000 tensors (empty ones included) in one batch, bit-identical to
   the NumPy reference backend.
6. ``store``: a CUDA ParamStore vs a CPU one over four algorithms, bit for bit, including a
   checkpoint round trip.
7. ``bandwidth``: the fused AdamW step vs a device copy kernel moving the same bytes
   (ratio; informational).

Nothing here runs without a GPU: ``--help`` and the imports do, which CI checks. The CuPy
stand-in of the test suite (tests/support/fakecupy) is never a substitute for this.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepd.kernels import create_optimizer  # noqa: E402

from stepd.wire import narrow  # noqa: E402

LARGE = 2**31 + 1000


def _cupy() -> Any:
    import cupy

    if getattr(cupy, "IS_STAND_IN", False):
        raise SystemExit("the CuPy stand-in is on the path: this check needs the real CuPy")
    if cupy.cuda.runtime.getDeviceCount() < 1:
        raise SystemExit("no CUDA device")
    return cupy


def check_build() -> dict[str, Any]:
    from stepd.kernels.backends import cuda

    backend = cuda.CudaBackend()
    backend.warm_up()
    backend.self_test()
    return {"entry_points": len(cuda.entry_points()), "module": str(cuda._module())}


def check_pytest_gpu() -> dict[str, Any]:
    env = {**os.environ, "STEPD_REQUIRE_GPU": "1"}
    env.pop("STEPD_TEST_FAKE_CUDA", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr[-500:]]
    if proc.returncode != 0:
        raise AssertionError(f"pytest -m gpu failed: {proc.stdout[-3000:]}")
    return {"summary": tail[0]}


def check_subnormals(cp: Any) -> dict[str, Any]:
    tiny = np.finfo(np.float32).smallest_subnormal
    rng = np.random.default_rng(1)
    n = 1 << 16
    compared = []
    for algorithm in ("adamw", "sgd", "lion", "adam"):
        host = (rng.integers(-50, 50, n) * tiny).astype(np.float32)
        dev = cp.asarray(host)
        cpu = create_optimizer(algorithm, backend="cpu", lr=1e-3)
        gpu = create_optimizer(algorithm, backend="cuda", lr=1e-3)
        for _ in range(5):
            g = (rng.integers(-50, 50, n) * tiny).astype(np.float32)
            cpu.step("p", (n,), host, g)
            gpu.step("p", (n,), dev, cp.asarray(g))
            cpu.end_iteration()
            gpu.end_iteration()
        if dev.get().tobytes() != host.tobytes():
            raise AssertionError(f"{algorithm}: subnormal results differ (flush-to-zero?)")
        compared.append(algorithm)
    return {"algorithms": compared, "subnormal_params": int(np.sum(np.abs(host) < 1.2e-38))}


def check_large(cp: Any, algorithm: str) -> dict[str, Any]:
    param = cp.ones(LARGE, dtype=cp.float32)
    grad = cp.full(LARGE, 0.5, dtype=cp.float32)
    opt = create_optimizer(algorithm, backend="cuda", lr=1e-2)
    opt.step("big", (LARGE,), param, grad)
    cp.cuda.Device().synchronize()
    ok = bool(cp.isfinite(param).all())
    idx = np.array([0, 2**31 - 1, 2**31, LARGE - 1])
    samples = param[cp.asarray(idx)].get()
    if not ok:
        raise AssertionError(f"{algorithm}: non-finite values")
    if algorithm == "sgd":
        want = np.float32(1) + np.float32(-1e-2) * np.float32(0.5)
        if not (samples == want).all():
            raise AssertionError(f"sgd: samples {samples} != {want} (tail not stepped?)")
    elif not (samples != 1).all():
        raise AssertionError(f"{algorithm}: the tail was not stepped: {samples}")
    del param, grad, opt
    cp.get_default_memory_pool().free_all_blocks()
    return {"elements": LARGE, "samples": samples.tolist()}


def check_many(cp: Any) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    sizes = rng.integers(0, 300, 66_000)
    sizes[::97] = 0
    sizes[0] = 1 << 22
    host = [rng.standard_normal(int(n)).astype(np.float32) for n in sizes]
    dev = [cp.asarray(h) for h in host]
    ref = create_optimizer("adamw", backend="reference", lr=1e-3)
    gpu = create_optimizer("adamw", backend="cuda", lr=1e-3)
    for step in range(2):
        dtype = np.dtype(np.float32) if step == 0 else np.dtype(np.uint16)
        grads = [narrow(np, rng.standard_normal(int(n)).astype(np.float32), dtype) for n in sizes]
        ref.step_batch(
            [
                (f"p{i}", (int(n),), h, g)
                for i, (n, h, g) in enumerate(zip(sizes, host, grads, strict=True))
            ]
        )
        gpu.step_batch(
            [
                (f"p{i}", (int(n),), d, cp.asarray(g))
                for i, (n, d, g) in enumerate(zip(sizes, dev, grads, strict=True))
            ]
        )
        ref.end_iteration()
        gpu.end_iteration()
    bad = [
        i
        for i, (h, d) in enumerate(zip(host, dev, strict=True))
        if d.get().tobytes() != h.tobytes()
    ]
    if bad:
        raise AssertionError(f"{len(bad)} tensors differ from the reference, first {bad[:5]}")
    return {"tensors": len(sizes), "empty": int((sizes == 0).sum())}


def check_store(cp: Any) -> dict[str, Any]:
    from stepd.service.store import ParamStore

    rng = np.random.default_rng(3)
    done = []
    for algorithm in ("adamw", "lion", "sophia", "sgd"):
        stores = [ParamStore("cpu"), ParamStore("cuda")]
        value = rng.standard_normal((64, 33)).astype(np.float32)
        for s in stores:
            s.register("w", (64, 33), value, algorithm, {"lr": 1e-2})
            s.register("b", (33,), None, algorithm, {"lr": 1e-2})
        for _ in range(5):
            grads = {
                "w": rng.standard_normal((64, 33)).astype(np.float32),
                "b": narrow(np, rng.standard_normal(33).astype(np.float32), np.dtype(np.uint16)),
            }
            outs = [s.step(grads, read_back=True) for s in stores]
            for a, b in zip(*outs, strict=True):
                if a.param.tobytes() != b.param.tobytes():
                    raise AssertionError(f"{algorithm}: {a.name} differs")
            if algorithm == "sophia":
                h = np.abs(rng.standard_normal((64, 33))).astype(np.float32)
                for s in stores:
                    s.update_hessian("w", h)
            for s in stores:
                s.end_iteration()
        # checkpoint round trip: the CUDA store's snapshot restored into a fresh CUDA store
        tensors, meta = stores[1].write_snapshot(
            lambda t, m: ({k: np.array(v, copy=True) for k, v in t.items()}, m)
        )
        fresh = ParamStore("cuda")
        fresh.restore(tensors, meta)
        for name in ("w", "b"):
            got, want = fresh.inspect(name), stores[0].inspect(name)
            if got[0].tobytes() != want[0].tobytes():
                raise AssertionError(f"{algorithm}: {name} differs after the round trip")
            for slot, buf in want[1].items():
                if got[1][slot].tobytes() != buf.tobytes():
                    raise AssertionError(f"{algorithm}: {name}.{slot} differs after the round trip")
        done.append(algorithm)
    return {"algorithms": done}


def check_bandwidth(cp: Any) -> dict[str, Any]:
    n = 1 << 27
    p, g, m, v = (cp.ones(n, dtype=cp.float32) for _ in range(4))
    opt = create_optimizer("adamw", backend="cuda", lr=1e-3)
    copy = cp.ElementwiseKernel(
        "float32 a, float32 b, float32 c, float32 d",
        "float32 x, float32 y, float32 z",
        "x = a + b; y = c + d; z = a - d;",
        "stepd_copy_anchor",
    )
    x, y, z = (cp.empty_like(p) for _ in range(3))

    def timed(fn: Callable[[], None]) -> float:
        fn()
        cp.cuda.Device().synchronize()
        runs = []
        for _ in range(10):
            t = time.perf_counter()
            fn()
            cp.cuda.Device().synchronize()
            runs.append(time.perf_counter() - t)
        return float(np.median(runs))

    step = timed(lambda: opt.step("p", (n,), p, g))
    anchor = timed(lambda: copy(p, g, m, v, x, y, z))  # read 4, write 3: AdamW's traffic
    # 8-bit state: p and g as above, two uint8 codes read and written (16 bytes per element
    # against 28): its anchor is the same copy kernel scaled by 16/28
    opt8 = create_optimizer("adamw8bit", backend="cuda", lr=1e-3)
    step8 = timed(lambda: opt8.step("p", (n,), p, g))
    return {
        "adamw_s": step,
        "copy_anchor_s": anchor,
        "ratio_anchor_over_adamw": anchor / step,
        "adamw8bit_s": step8,
        "ratio_anchor_16_28_over_adamw8bit": anchor * 16 / 28 / step8,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--skip-pytest", action="store_true")
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("STEPD_CACHE_DIR", tempfile.mkdtemp(prefix="stepd-gpu-check-"))
    cp = _cupy()
    checks: list[tuple[str, Callable[[], dict[str, Any]]]] = [("build", check_build)]
    if not args.skip_pytest:
        checks.append(("pytest_gpu", check_pytest_gpu))
    checks += [
        ("subnormals", lambda: check_subnormals(cp)),
        ("many_tensors", lambda: check_many(cp)),
        ("store", lambda: check_store(cp)),
        ("bandwidth", lambda: check_bandwidth(cp)),
    ]
    if not args.skip_large:
        checks += [
            ("large_sgd", lambda: check_large(cp, "sgd")),
            ("large_adafactor", lambda: check_large(cp, "adafactor")),
        ]
    summary: dict[str, Any] = {"device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode()}
    failed = 0
    for name, fn in checks:
        t = time.perf_counter()
        try:
            entry = {"ok": True, **fn()}
        except Exception as exc:  # every check reports; one failure does not stop the rest
            failed += 1
            entry = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(),
            }
        entry["seconds"] = round(time.perf_counter() - t, 2)
        summary[name] = entry
        print(
            f"{name}: {'ok' if entry['ok'] else 'FAILED ' + entry['error']} ({entry['seconds']} s)",
            flush=True,
        )
        args.out.write_text(json.dumps(summary, indent=2, default=str))
    print(f"summary written to {args.out}; {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
