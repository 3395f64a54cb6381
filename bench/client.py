"""The client transports against their anchors, measured in the same run.

    python bench/client.py [--elements 67108864] [--rounds 5000] [--reps 5] [--only big]

- one AdamW step of a 64M-element float32 tensor, in interleaved rounds: in process (the
  fused CPU kernel, the anchor; and the same over arrays in a memory file on 4 KiB pages and
  on huge pages, see ``stepd.hugepages``) vs zero-copy ``shm://`` (arrays from
  ``ShmTransport.buffers``, which live in the segment) with huge pages and with
  ``STEPD_HUGE_PAGES=off`` (goal ≤ 1.10x); then ``shm://`` with ordinary arrays (copied)
  and ``http://``;
- p50 / p99 round trip of a 1-element step over ``shm://`` next to a bare Unix-socket
  ping-pong between two Python processes (goal ≤ 3x), and over ``http://``;
- 200 tensors x 10k elements: one ``step_batch`` vs 200 single steps, per transport.

One ``stepd serve --shm-socket`` process (CPU) serves both ``shm://`` and ``http://``; a
second one, with ``STEPD_HUGE_PAGES=off``, the 4 KiB-page zero-copy row.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# This process steps in-process between the server's steps: its OpenMP threads sleep when
# idle, as the server's do (`stepd serve` sets the same), or their spinning after each
# in-process step would slow the server's next step on a small host: an artifact of
# interleaving, not a cost of the transport.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepd.client import connect  # noqa: E402
from stepd.kernels import create_optimizer  # noqa: E402

from bench.timing import timed  # noqa: E402
from stepd import hugepages  # noqa: E402
from tests.support.server import Server, ShmServer  # noqa: E402

HP = {"lr": 1e-3, "weight_decay": 0.01}
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

PONG = """
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
buf = bytearray(8)
while True:
    n = s.recv_into(buf)
    if not n:
        break
    s.sendall(buf[:n])
"""


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


def big_step(server: Server, small_server: Server, n: int, reps: int) -> None:
    """Interleaved rounds: each round times one step of every variant, so a noisy neighbour
    hits them all alike; medians over the rounds, ratios to the in-process step."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n, dtype=np.float32)
    g = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-2)
    steps: dict[str, Callable[[], object]] = {}
    keep: list[object] = []

    local = create_optimizer("adamw", backend="cpu", **HP)
    p = p0.copy()
    steps["in-process fused step (anchor)"] = lambda: local.step_batch([("big", (n,), p, g)])

    # The same in-process step with param and grad in a memory file, as the server sees
    # them over shm://: on 4 KiB pages (shmem THP off, as on many hosts), and collapsed
    # into huge pages (stepd.hugepages).
    for setting in ("off", "auto"):
        os.environ["STEPD_HUGE_PAGES"] = setting
        fd, seg = hugepages.create_segment("stepd-bench", 8 * n, SEALS)
        os.close(fd)
        sp = np.frombuffer(seg.mm, np.float32, n, seg.offset)
        sg = np.frombuffer(seg.mm, np.float32, n, seg.offset + 4 * n)
        sp[...], sg[...] = p0, g
        opt = create_optimizer("adamw", backend="cpu", **HP)
        steps[f"in-process, arrays in a memfd, {seg.pages} pages"] = lambda opt=opt, sp=sp, sg=sg: (
            opt.step_batch([("big", (n,), sp, sg)])
        )
        keep += [seg, opt]
    os.environ.pop("STEPD_HUGE_PAGES")
    # ... and with the finite screen the server runs on every gradient (one more read of
    # it, 4 of 32 bytes per element): the floor of a server step on this host.
    screen = opt.backend.all_finite
    steps["  + the server's finite screen of the gradient"] = lambda: (
        screen(sg),
        opt.step_batch([("big", (n,), sp, sg)]),
    )

    remotes = []
    for srv, setting in ((server, "auto"), (small_server, "off")):
        os.environ["STEPD_HUGE_PAGES"] = setting  # the client's side of the segment
        o = connect(srv.shm_url, "adamw", **HP)
        remotes.append(o)
        bp, bg = o.buffers("big.buf", (n,), p0)
        bg[...] = g
        pages = o.transport.pages("big.buf")
        steps[f"shm:// zero copy (opt.buffers), {pages} pages"] = lambda o=o, bp=bp, bg=bg: o.step(
            "big.buf", (n,), bp, bg
        )
    os.environ.pop("STEPD_HUGE_PAGES")

    for _ in range(2):  # warm-up: state allocated, pages faulted in
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(reps):
        for label, fn in steps.items():
            t = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t)
    rows = [(label, statistics.median(ts)) for label, ts in times.items()]
    for o in remotes:
        o.close()
    steps.clear()
    keep.clear()
    local = None  # free its state before the copying remotes run

    with connect(server.shm_url, "adamw", **HP) as o:
        p = p0.copy()
        t = timed(lambda: o.step("big.shm", (n,), p, g), reps, 2)
        rows.append(("shm:// (arrays copied to/from the segment)", statistics.median(t)))
    with connect(server.url, "adamw", **HP) as o:
        p = p0.copy()
        t = timed(lambda: o.step("big.http", (n,), p, g), reps, 2)
        rows.append(("http://", statistics.median(t)))
    anchor = rows[0][1]
    print(f"\nAdamW step of {n / 2**20:.0f}M float32 elements (median of {reps}, interleaved):")
    for label, sec in rows:
        print(f"  {label:46s} {sec * 1e3:8.1f} ms  {sec / anchor:5.2f}x")


def ping_pong(rounds: int) -> list[float]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen([sys.executable, "-c", PONG, str(b.fileno())], pass_fds=[b.fileno()])
    b.close()
    msg, buf = b"12345678", bytearray(8)
    out = []
    try:
        for i in range(rounds + 200):
            t = time.perf_counter()
            a.sendall(msg)
            got = 0
            while got < 8:
                got += a.recv_into(memoryview(buf)[got:])
            if i >= 200:
                out.append(time.perf_counter() - t)
    finally:
        a.close()
        proc.wait(10)
    return out


def latency(server: Server, shm_url: str, rounds: int) -> None:
    bare = ping_pong(rounds)
    p, g = np.ones(1, np.float32), np.full(1, 1e-3, np.float32)
    rows = [("bare Unix-socket ping-pong (anchor)", bare)]
    with connect(shm_url, "adamw", **HP) as o:
        rows.append(("shm:// ping (no step)", timed(o.transport.ping, rounds, 200)))
        rows.append(
            ("shm:// 1-element step", timed(lambda: o.step("tiny.shm", (1,), p, g), rounds, 200))
        )
    with connect(server.url, "adamw", **HP) as o:
        rows.append(
            (
                "http:// 1-element step",
                timed(lambda: o.step("tiny.http", (1,), p, g), rounds // 5, 100),
            )
        )
    b50, b99 = pct(bare, 50), pct(bare, 99)
    print(f"\nround trip, {rounds} rounds (p50 / p99, ratio to the bare ping-pong):")
    for label, xs in rows:
        p50, p99 = pct(xs, 50), pct(xs, 99)
        print(
            f"  {label:40s} p50 {p50 * 1e6:8.1f} us ({p50 / b50:5.2f}x)"
            f"   p99 {p99 * 1e6:8.1f} us ({p99 / b99:5.2f}x)"
        )


def many(server: Server, shm_url: str, count: int = 200, size: int = 10_000) -> None:
    rng = np.random.default_rng(1)
    print(f"\n{count} tensors x {size} elements, one iteration (median of 5):")
    for label, url in (
        ("local://", "local://?backend=cpu"),
        ("shm://", shm_url),
        ("http://", server.url),
    ):
        with connect(url, "adamw", **HP) as o:
            tag = label.rstrip(":/")
            items = [
                (f"many.{tag}.{i}", (size,), rng.standard_normal(size, dtype=np.float32), None)
                for i in range(count)
            ]
            items = [(n, s, p, rng.standard_normal(size, dtype=np.float32)) for n, s, p, _ in items]
            batch = statistics.median(timed(lambda o=o, items=items: o.step_batch(items), 5))
            single = statistics.median(
                timed(lambda o=o, items=items: [o.step(*it) for it in items], 5)
            )
        print(
            f"  {label:10s} step_batch {batch * 1e3:8.2f} ms   200 x step {single * 1e3:8.2f} ms"
            f"   batch speed-up {single / batch:5.1f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=64 << 20)
    ap.add_argument("--rounds", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=5, help="rounds of the big step")
    ap.add_argument("--only", choices=("latency", "many", "big"), help="one section")
    args = ap.parse_args()
    with ShmServer() as server, ShmServer(STEPD_HUGE_PAGES="off") as small_server:
        print(f"stepd serve (cpu) with --shm-socket {server.socket}; {os.cpu_count()} CPUs")
        if args.only in (None, "latency"):
            latency(server, server.shm_url, args.rounds)
        if args.only in (None, "many"):
            many(server, server.shm_url)
        if args.only in (None, "big"):
            big_step(server, small_server, args.elements, args.reps)


if __name__ == "__main__":
    main()
