"""The client transports against their anchors, measured in the same run.

    python bench/client.py [--elements 67108864] [--rounds 5000]

- one AdamW step of a 64M-element float32 tensor: in process (the fused CPU kernel, the
  anchor; and the same over arrays in a /dev/shm mapping, the floor of shm:// on hosts
  whose shared memory gets no huge pages) vs ``shm://`` (ordinary arrays, and arrays from
  ``ShmTransport.buffers`` that live in the segment) vs ``http://`` (goal for shm ≤ 1.15x);
- p50 / p99 round trip of a 1-element step over ``shm://`` next to a bare Unix-socket
  ping-pong between two Python processes (goal ≤ 3x), and over ``http://``;
- 200 tensors x 10k elements: one ``step_batch`` vs 200 single steps, per transport.

One ``stepd serve --shm-socket`` process (CPU) serves both ``shm://`` and ``http://``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepd.client import connect  # noqa: E402
from stepd.kernels import create_optimizer  # noqa: E402

from bench.timing import timed  # noqa: E402
from tests.support.server import Server  # noqa: E402

HP = {"lr": 1e-3, "weight_decay": 0.01}

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


def big_step(server: Server, shm_url: str, n: int) -> None:
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n, dtype=np.float32)
    g = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-2)
    reps = 5

    opt = create_optimizer("adamw", backend="cpu", **HP)
    p = p0.copy()
    anchor = statistics.median(timed(lambda: opt.step_batch([("big", (n,), p, g)]), reps, 2))
    opt = None  # free its state before the remote runs

    # The same in-process step with param and grad in a /dev/shm mapping, as the server
    # sees them over shm://: where shared memory gets no huge pages (shmem THP off, as on
    # many hosts), this is the floor for shm:// on this host.
    path = f"/dev/shm/stepd-bench-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 8 * n)
        mm = mmap.mmap(fd, 8 * n)
    finally:
        os.close(fd)
        os.unlink(path)
    sp, sg = np.frombuffer(mm, np.float32, n, 0), np.frombuffer(mm, np.float32, n, 4 * n)
    sp[...], sg[...] = p0, g
    opt = create_optimizer("adamw", backend="cpu", **HP)
    in_shm = statistics.median(timed(lambda: opt.step_batch([("big", (n,), sp, sg)]), reps, 2))
    opt = sp = sg = None
    mm.close()

    rows = [
        ("in-process fused step (anchor)", anchor),
        ("in-process, arrays in /dev/shm pages", in_shm),
    ]
    with connect(shm_url, "adamw", **HP) as o:
        p = p0.copy()
        t = timed(lambda: o.step("big.shm", (n,), p, g), reps, 2)
        rows.append(("shm:// (arrays copied to/from the segment)", statistics.median(t)))
        bp, bg = o.buffers("big.buf", (n,), p0)
        bg[...] = g
        t = timed(lambda: o.step("big.buf", (n,), bp, bg), reps, 2)
        rows.append(("shm:// (opt.buffers: zero copy)", statistics.median(t)))
    with connect(server.url, "adamw", **HP) as o:
        p = p0.copy()
        t = timed(lambda: o.step("big.http", (n,), p, g), reps, 2)
        rows.append(("http://", statistics.median(t)))
    print(f"\nAdamW step of {n / 2**20:.0f}M float32 elements (median of {reps}):")
    for label, s in rows:
        print(f"  {label:46s} {s * 1e3:8.1f} ms  {s / anchor:5.2f}x")


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
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="stepd-bench-"))
    sock = tmp / "stepd.sock"
    try:
        with Server(tmp / "ckpt", STEPD_SHM_SOCKET=str(sock)) as server:
            shm_url = f"shm://{sock}"
            print(f"stepd serve (cpu) with --shm-socket {sock}; {os.cpu_count()} CPUs")
            latency(server, shm_url, args.rounds)
            many(server, shm_url)
            big_step(server, shm_url, args.elements)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
