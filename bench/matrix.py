"""The matrix-aware algorithms against their anchors, measured in the same run.

    python bench/matrix.py [--ns-size 4096] [--soap-size 1024]

- Muon's Newton–Schulz (5 quintic steps) on an n x n matrix vs 15 plain n x n matmuls, the
  work it must do (3 per step) — goal ≤ 1.1x;
- SOAP's cost per step, amortised over ``precondition_frequency`` steps (one of which
  refreshes the eigenbases), vs AdamW on the same tensor;
- Adafactor's optimizer-state bytes vs AdamW's for an n x n parameter (O(n + m) vs O(nm)).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stepd.kernels import create_optimizer
from stepd.kernels.algorithms.muon import newton_schulz_orth

from bench.timing import timed


def best(fn, repeat: int) -> float:
    return min(timed(fn, repeat))


def newton_schulz(n: int) -> None:
    rng = np.random.default_rng(0)
    g = rng.standard_normal((n, n), dtype=np.float32)
    x = g / np.linalg.norm(g)

    def matmuls() -> None:
        y = x
        for _ in range(15):
            y = x @ y
        return y

    ns = best(lambda: newton_schulz_orth(g), 3)
    mm = best(matmuls, 3)
    print(
        f"Newton-Schulz on {n}x{n}: {ns:.3f} s vs 15 matmuls {mm:.3f} s: "
        f"{ns / mm:.3f}x  (goal <= 1.1)"
    )


def per_step(algorithm: str, n: int, steps: int, **hp) -> float:
    rng = np.random.default_rng(1)
    p = rng.standard_normal((n, n), dtype=np.float32)
    grads = [rng.standard_normal((n, n), dtype=np.float32) for _ in range(2)]
    opt = create_optimizer(algorithm, backend="cpu", **hp)
    opt.step("w", p.shape, p, grads[0])  # allocate state (and, for SOAP, the first basis)
    opt.end_iteration()
    start = time.perf_counter()
    for i in range(steps):
        opt.step("w", p.shape, p, grads[i % 2])
        opt.end_iteration()
    return (time.perf_counter() - start) / steps


def soap_vs_adamw(n: int) -> None:
    freq = 10
    soap = per_step("soap", n, 2 * freq, precondition_frequency=freq)
    adamw = per_step("adamw", n, 2 * freq)
    print(
        f"SOAP on {n}x{n}, precondition_frequency={freq}: {soap * 1e3:.1f} ms/step vs AdamW "
        f"{adamw * 1e3:.2f} ms/step: {soap / adamw:.1f}x"
    )


def adafactor_memory(n: int, m: int) -> None:
    def state_bytes(algorithm: str) -> int:
        opt = create_optimizer(algorithm, backend="cpu")
        p = np.zeros((n, m), np.float32)
        opt.step("w", p.shape, p, np.ones_like(p))
        return sum(s.nbytes for s in opt.state("w").slots.values())

    ada, adamw = state_bytes("adafactor"), state_bytes("adamw")
    print(
        f"state of a {n}x{m} parameter: Adafactor {ada:,} B ((n+m) x 4 = {(n + m) * 4:,}), "
        f"AdamW {adamw:,} B: {ada / adamw:.5f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ns-size", type=int, default=4096)
    parser.add_argument("--soap-size", type=int, default=1024)
    args = parser.parse_args()
    newton_schulz(args.ns_size)
    soap_vs_adamw(args.soap_size)
    adafactor_memory(4096, 1024)


if __name__ == "__main__":
    main()
