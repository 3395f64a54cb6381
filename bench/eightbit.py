"""8-bit optimizer state against float32 AdamW, measured in the same run.

    python bench/eightbit.py [--elements 67108864] [--repeat 7] [--runs 3]

Prints, on one tensor of ``--elements`` elements:
- state bytes of ``adamw8bit`` (uint8 codes + a float32 absmax per 256 elements, two
  moments) over float32 AdamW's (goal ≤ 0.27);
- bytes moved per element by a step: float32 AdamW reads p, g, m, v and writes p, m, v
  (28); the 8-bit step reads p, g and two codes and writes p and two codes (16, plus
  16 bytes of absmax per 256 elements);
- step time of stepd's ``adamw8bit`` (fused CPU kernel) against ``torch.optim.AdamW(fused=True)``
  on float32 state, and against stepd's own float32 ``adamw``: ratios > 1 mean faster
  (goal ≥ 1.4x torch). The three steps are interleaved, ``--repeat`` times each; each
  figure is a median over those, and the median of ``--runs`` runs is reported with its
  spread. Process CPU seconds (all threads) per step too: on a machine others share,
  wall-clock swings with their load, CPU time much less;
- the compute floor: each step on ``--cache-elements`` elements (their data fit in the
  caches), per element, next to the same at ``--elements``. Where the 8-bit step takes as
  long per element in cache as in memory, it is bound by its arithmetic, not by the bytes
  it moves, and torch's time per element over the 8-bit step's in-cache time bounds the
  speed-up any memory saving can give.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# torch and stepd each bring an OpenMP runtime, stepped in turn here: their threads sleep
# when idle, or each pool's spinning after its step slows the other's next one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stepd.kernels import create_optimizer

FLOAT32_BYTES = 28  # read p, g, m, v; write p, m, v
EIGHTBIT_BYTES = 16 + 16 / 256  # read p, g, 2 codes; write p, 2 codes; absmax r/w


def state_bytes(opt, name: str) -> int:
    return sum(a.nbytes for a in opt.state(name).slots.values())


def one_run(n: int, repeat: int, rng: np.random.Generator) -> dict[str, float]:
    """One run: the three steps interleaved, ``repeat`` times each after a warm-up; the
    median wall-clock and process CPU seconds (all threads) of each."""
    import torch

    g = rng.standard_normal(n, dtype=np.float32)
    p = rng.standard_normal(n, dtype=np.float32)
    tp = torch.from_numpy(p.copy())
    tp.grad = torch.from_numpy(g)
    topt = torch.optim.AdamW([tp], lr=1e-3, weight_decay=0.01, fused=True)
    steps = {"torch": topt.step}
    out: dict[str, float] = {}
    for algorithm in ("adamw", "adamw8bit"):
        opt = create_optimizer(algorithm, backend="cpu", lr=1e-3, weight_decay=0.01)
        q = p.copy()
        steps[algorithm] = lambda opt=opt, q=q: opt.step("w", (n,), q, g)
        steps[algorithm]()  # allocates the state
        out[f"{algorithm}_state"] = state_bytes(opt, "w")
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(repeat):
        for k, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            times[k].append((time.perf_counter() - wall, time.process_time() - cpu))
    for k, pairs in times.items():
        out[k] = statistics.median(w for w, _ in pairs)
        out[f"{k}_cpu"] = statistics.median(c for _, c in pairs)
    return out


def per_element_ns(n: int, repeat: int, rng: np.random.Generator) -> dict[str, float]:
    """The median step time per element, in ns, of each step on ``n`` elements."""
    r = one_run(n, repeat, rng)
    return {k: r[k] / n * 1e9 for k in ("torch", "adamw", "adamw8bit")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--elements", type=int, default=64 * 2**20)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache-elements", type=int, default=2**20)  # L3-resident
    args = parser.parse_args()
    import torch

    n = args.elements
    rng = np.random.default_rng(0)
    runs = [one_run(n, args.repeat, rng) for _ in range(args.runs)]
    vs_torch = [r["torch"] / r["adamw8bit"] for r in runs]
    vs_ours = [r["adamw"] / r["adamw8bit"] for r in runs]
    cpu_vs_torch = [r["torch_cpu"] / r["adamw8bit_cpu"] for r in runs]
    memory = runs[0]["adamw8bit_state"] / runs[0]["adamw_state"]
    print(f"CPU, {n:,} elements, {torch.get_num_threads()} threads, {args.runs} runs")
    print(f"  state bytes adamw8bit / adamw       {memory:7.4f}   (goal <= 0.27)")
    print(f"  bytes moved per element             {EIGHTBIT_BYTES:7.2f} vs {FLOAT32_BYTES}")
    for r in runs:
        gb = n * EIGHTBIT_BYTES / r["adamw8bit"] / 1e9
        print(
            f"  run: torch {r['torch'] * 1e3:7.1f} ms, adamw {r['adamw'] * 1e3:7.1f} ms, "
            f"adamw8bit {r['adamw8bit'] * 1e3:7.1f} ms ({gb:5.1f} GB/s); CPU ms "
            f"{r['torch_cpu'] * 1e3:.0f} / {r['adamw_cpu'] * 1e3:.0f} / "
            f"{r['adamw8bit_cpu'] * 1e3:.0f}"
        )
    print(
        f"  adamw8bit speed / torch fused       {statistics.median(vs_torch):7.3f}x  "
        f"[{min(vs_torch):.3f}, {max(vs_torch):.3f}]  (goal >= 1.4)"
    )
    print(
        f"  adamw8bit speed / stepd adamw       {statistics.median(vs_ours):7.3f}x  "
        f"[{min(vs_ours):.3f}, {max(vs_ours):.3f}]"
    )
    print(  # steadier than wall-clock on a machine others share
        f"  CPU seconds torch / adamw8bit       {statistics.median(cpu_vs_torch):7.3f}x  "
        f"[{min(cpu_vs_torch):.3f}, {max(cpu_vs_torch):.3f}]"
    )
    cached = per_element_ns(args.cache_elements, 30, rng)
    big = {k: statistics.median(r[k] for r in runs) / n * 1e9 for k in cached}
    print(f"  ns per element, {args.cache_elements:,} elements (in cache) / {n:,}:")
    for k in cached:
        print(f"    {k:10s} {cached[k]:6.3f} / {big[k]:6.3f}")
    print(
        f"  bound: torch at {n:,} / adamw8bit in cache  {big['torch'] / cached['adamw8bit']:7.3f}x"
    )


if __name__ == "__main__":
    main()
