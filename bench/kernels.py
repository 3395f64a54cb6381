"""Fused step kernels against their anchors, measured in the same run.

    python bench/kernels.py [--elements 67108864] [--repeat 15]

Prints, on float32 buffers of ``--elements`` elements:
- the read-4/write-3 streaming bandwidth of this machine (the roofline of an AdamW step,
  28 bytes per element), from a plain OpenMP loop built with the kernels' own flags;
- stepd's fused CPU AdamW and ``torch.optim.AdamW(fused=True)`` in effective GB/s, and the
  ratios (goals: ≥ 0.95 of the roofline, ≥ 1.05x torch);
- 200 tensors x 10k elements through one ``step_batch`` vs one 2M-element tensor, interleaved
  (goal ≤ 1.15x; 56 MB, so in cache on hosts with a large L3, where Python per tensor shows);
- on a CUDA device (if present): the same AdamW step against a read-4/write-3 CuPy kernel.
Each figure is the median over ``--repeat`` timed runs after a warm-up.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# torch and stepd each bring an OpenMP runtime, stepped in turn here: their threads sleep
# when idle, or each pool's spinning after its step slows the other's next one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stepd.kernels import create_optimizer
from stepd.kernels.backends.build import CXXFLAGS, NATIVE, find_compiler
from stepd.kernels.ops import Launch

from bench.timing import timed

BYTES_PER_ELEMENT = 28  # AdamW: read p, g, m, v; write p, m, v


def median_time(fn: Callable[[], object], repeat: int, sync: Callable[[], None] = lambda: None):
    return statistics.median(timed(fn, repeat, sync=sync))


def interleaved(
    fns: list[Callable[[], object]], repeat: int, sync: Callable[[], None] = lambda: None
) -> list[float]:
    """Median seconds of each of ``fns``, timed in turn ``repeat`` times after one warm-up
    round: a noisy neighbour slows them all alike."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeat + 1):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            sync()
            if r:
                out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def gbps(n: int, seconds: float) -> float:
    return n * BYTES_PER_ELEMENT / seconds / 1e9


def build_stream() -> ctypes.CDLL:
    out = Path(tempfile.mkdtemp()) / "stream.so"
    src = Path(__file__).with_name("stream.cpp")
    subprocess.run([find_compiler(), *CXXFLAGS, NATIVE, str(src), "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    f32p = ctypes.POINTER(ctypes.c_float)
    lib.stream_r4w3.argtypes = [f32p, f32p, f32p, f32p, ctypes.c_int64, ctypes.c_float]
    return lib


def cpu_section(n: int, repeat: int) -> None:
    rng = np.random.default_rng(0)
    f32p = ctypes.POINTER(ctypes.c_float)

    def buffers() -> list[np.ndarray]:
        return [rng.standard_normal(n, dtype=np.float32) for _ in range(4)]

    lib = build_stream()
    streams = [x.ctypes.data_as(f32p) for x in buffers()]  # the pointers keep the arrays alive
    roof = median_time(lambda: lib.stream_r4w3(*streams, n, 0.5), repeat)
    streams.clear()  # free 1 GB before the next measurement

    p, g, _, _ = buffers()
    opt = create_optimizer("adamw", backend="cpu", lr=1e-3, weight_decay=0.01)
    ours = median_time(lambda: opt.step("w", (n,), p, g), repeat)

    import torch

    tp = torch.from_numpy(p)
    tp.grad = torch.from_numpy(g)
    topt = torch.optim.AdamW([tp], lr=1e-3, weight_decay=0.01, fused=True)
    theirs = median_time(topt.step, repeat)

    print(f"CPU, {n:,} float32 elements, {torch.get_num_threads()} threads")
    print(f"  roofline (read 4 / write 3 streams) {gbps(n, roof):7.1f} GB/s")
    print(f"  stepd fused AdamW                   {gbps(n, ours):7.1f} GB/s")
    print(f"  torch AdamW(fused=True)             {gbps(n, theirs):7.1f} GB/s")
    print(f"  stepd / roofline                    {roof / ours:7.3f}   (goal >= 0.95)")
    print(f"  stepd / torch fused                 {theirs / ours:7.3f}x  (goal >= 1.05)")


def batch_section(repeat: int, backend: str = "cpu", xp=np, sync=lambda: None) -> None:
    count, size = 200, 10_000
    rng = np.random.default_rng(1)
    opt = create_optimizer("adamw", backend=backend)
    small = [
        (
            f"t{i}",
            (size,),
            xp.asarray(rng.standard_normal(size, dtype=np.float32)),
            xp.asarray(rng.standard_normal(size, dtype=np.float32)),
        )
        for i in range(count)
    ]
    big_p = xp.asarray(rng.standard_normal(count * size, dtype=np.float32))
    big_g = xp.asarray(rng.standard_normal(count * size, dtype=np.float32))
    batched, single = interleaved(
        [lambda: opt.step_batch(small), lambda: opt.step("big", (count * size,), big_p, big_g)],
        repeat * 4,
        sync,
    )
    print(
        f"  {count} x {size:,} via step_batch vs one {count * size:,} tensor: "
        f"{batched / single:.3f}x  (goal <= 1.15; {batched * 1e3:.2f} ms vs {single * 1e3:.2f} ms)"
    )
    # The same launch with its pointer table prepared (what a repeated layout runs): the
    # kernel's multi-tensor loop on its own, without the Python per-tensor checks.
    op = opt.algorithm.op()
    args = op.pack(opt.algorithm.scalars(opt.global_step + 1, opt.lr, False))
    launches = [
        Launch(p, g, [opt.state(n).slots[k] for k in op.slots], args) for n, _, p, g in small
    ]
    prepare = getattr(opt.backend, "prepare", None)
    if prepare is None:
        kernel = median_time(lambda: opt.backend.launch(op, launches), repeat * 4, sync)
    else:
        prepared, grads = prepare(op, launches), [g for *_, g in small]
        kernel = median_time(lambda: prepared.run(grads, args, 0), repeat * 4, sync)
    print(
        f"  the kernel alone (pointer table prepared): {kernel / single:.3f}x "
        f"({kernel * 1e3:.2f} ms; Python per tensor: {(batched - kernel) / count * 1e6:.1f} us)"
    )


def cuda_section(n: int, repeat: int) -> None:
    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception as exc:  # no CuPy, no driver or no device
        print(f"CUDA: skipped ({exc})")
        return
    sync = cp.cuda.Device().synchronize
    r4w3 = cp.ElementwiseKernel(
        "float32 x",
        "float32 a, float32 b, float32 c",
        "a = a * 0.5f + x; b = b * 0.5f - x; c = c * 0.5f + x * 0.5f;",
        "stepd_bench_r4w3",
    )
    streams = [cp.random.standard_normal(n, dtype=cp.float32) for _ in range(4)]
    roof = median_time(lambda: r4w3(*streams), repeat, sync)
    streams.clear()  # free 1 GB before the next measurement
    p, g = (cp.random.standard_normal(n, dtype=cp.float32) for _ in range(2))
    opt = create_optimizer("adamw", backend="cuda")
    ours = median_time(lambda: opt.step("w", (n,), p, g), repeat, sync)
    print(f"CUDA ({cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}), {n:,} elements")
    print(f"  roofline (read 4 / write 3 streams) {gbps(n, roof):7.1f} GB/s")
    print(f"  stepd fused AdamW                   {gbps(n, ours):7.1f} GB/s")
    print(f"  stepd / roofline                    {roof / ours:7.3f}   (goal >= 0.90)")
    batch_section(repeat, "cuda", cp, sync)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--elements", type=int, default=64 * 2**20)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    cpu_section(args.elements, args.repeat)
    batch_section(args.repeat)
    cuda_section(args.elements, args.repeat)


if __name__ == "__main__":
    main()
