"""The HTTP API and checkpoints against their anchors, measured in the same run.

    python bench/service.py [--checkpoint-gb 1.0]

- HTTP step of a 1M- and a 16M-element float32 tensor (gradient up, parameter down) in GB/s
  moved, next to a bare ASGI echo of the same bytes served by the same uvicorn (goal ≥ 0.9x);
- p50 / p99 of a 1-element step next to the echo's (goal ≤ 1.2x);
  (the step and the echo requests alternate, one each in turn: both see the same machine);
- a 64M-element step with bfloat16 gradients (the parameter back in bfloat16) next to the
  same step in float32 (goal <= 0.55x);
- checkpoint save and restore of ≥ 1 GB of state next to this disk's sequential write
  bandwidth (a file of the same size written and fsynced; goal ≥ 0.8x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.timing import timed  # noqa: E402
from stepd.wire import BF16, DTYPE_HEADER, narrow  # noqa: E402
from tests.support.server import Server, free_port  # noqa: E402


def start_echo() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(ROOT / "bench"),
            "echo_app:app",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.post(url, content=b"x", timeout=0.5)
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError("echo server did not start")


def interleaved(
    a: Callable[[], object], b: Callable[[], object], repeat: int
) -> tuple[list[float], list[float]]:
    """Seconds of ``repeat`` calls of each, alternating (after a warm-up of each): the
    machine's mood of the moment is shared by both."""
    ta: list[float] = []
    tb: list[float] = []
    a(), b()
    for _ in range(repeat):
        ta += timed(a, 1, warmup=0)
        tb += timed(b, 1, warmup=0)
    return ta, tb


def http_section(tmp: Path) -> None:
    echo, echo_url = start_echo()
    try:
        with (
            Server(tmp / "ckpt") as server,
            httpx.Client(base_url=server.url, timeout=120) as c,
            httpx.Client(base_url=echo_url, timeout=120) as e,
        ):
            for n in (1, 1 << 20, 1 << 24):
                name = f"w{n}"
                body = {"name": name, "shape": [n], "group": {"algorithm": "adamw"}}
                assert c.post("/v1/runs/t/params", json=body).status_code == 201
                grad = np.random.default_rng(0).standard_normal(n).astype(np.float32).tobytes()
                repeat = 300 if n == 1 else (30 if n == 1 << 20 else 9)

                def stepd(name=name, grad=grad):
                    r = c.post(f"/v1/runs/t/params/{name}/step", content=grad)
                    assert r.status_code == 200
                    assert len(r.content) == len(grad)

                def echo_(grad=grad):
                    r = e.post("/", content=grad)
                    assert len(r.content) == len(grad)

                ts, te = interleaved(stepd, echo_, repeat)
                if n == 1:
                    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] * 1e6  # noqa: E731
                    print(
                        f"tiny step (1 element): stepd p50 {q(ts, 50):.0f} us, p99 "
                        f"{q(ts, 99):.0f} us; echo p50 {q(te, 50):.0f} us, p99 {q(te, 99):.0f} us"
                    )
                    print(
                        f"  stepd / echo p50 latency   {q(ts, 50) / q(te, 50):.2f}x  (goal <= 1.2)"
                    )
                else:
                    moved = 2 * len(grad) / 1e9
                    gs, ge = moved / statistics.median(ts), moved / statistics.median(te)
                    print(
                        f"{n:>10,} elements: stepd {gs:.2f} GB/s, echo {ge:.2f} GB/s, "
                        f"ratio {gs / ge:.2f}  (goal >= 0.9)"
                    )
    finally:
        echo.terminate()
        echo.wait()


async def _asgi_call(app: Any, path: str, body: bytes) -> None:
    """One POST through an ASGI app in this process: no socket, no HTTP parser."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return pending.pop() if pending else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"host", b"bench"), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1),
        "root_path": "",
    }
    await app(scope, receive, send)
    assert sent[0]["status"] == 200, sent


def asgi_section(tmp: Path) -> None:
    """Where a step's time goes, without the network: the app's whole cost per request
    (adapter + engine), the engine's alone (``Engine.start_step`` as the app calls it), and the bare
    echo app's, interleaved; medians. The adapter's share is the first less the second."""
    import asyncio

    from echo_app import app as echo
    from fastapi.concurrency import run_in_threadpool
    from stepd.service.app import create_app
    from stepd.service.config import Settings
    from stepd.service.rwlock import WouldBlock

    async def step(engine: Any, grads: dict[str, np.ndarray]) -> None:
        # where the app runs it: on the event loop when the engine says it is cheap, else on
        # a worker thread (each thread has its own OpenMP team: mixing threads would set two
        # teams fighting over the cores)
        call = partial(engine.start_step, "t", grads, read_back=True)
        try:
            waiting = call(blocking=False)
        except WouldBlock:
            waiting = await run_in_threadpool(call)
        await waiting.wait_async()

    async def run() -> None:
        app = create_app(Settings(checkpoint_dir=tmp / "ckpt-asgi", device="cpu"))
        async with app.api.router.lifespan_context(app.api):
            engine = app.state.engine
            engine.open_run("t")
            for n in (1, 1 << 20, 1 << 24):
                name = f"w{n}"
                engine.register("t", name, (n,), np.zeros(n, np.float32), "adamw", {})
                body = np.random.default_rng(0).standard_normal(n).astype(np.float32).tobytes()
                grads = {name: np.frombuffer(body, np.float32)}
                repeat = 2000 if n == 1 else (40 if n == 1 << 20 else 6)
                calls = {
                    "echo": lambda body=body: _asgi_call(echo, "/", body),
                    "stepd": lambda name=name, body=body: _asgi_call(
                        app, f"/v1/runs/t/params/{name}/step", body
                    ),
                }
                times: dict[str, list[float]] = {"echo": [], "stepd": [], "engine": []}
                for _ in range(repeat + 1):
                    for key, call in calls.items():
                        start = time.perf_counter()
                        await call()
                        times[key].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    await step(engine, grads)
                    times["engine"].append(time.perf_counter() - start)
                us = {k: statistics.median(v[1:]) * 1e6 for k, v in times.items()}
                print(
                    f"in process, {n:>10,} elements: app {us['stepd']:.0f} us = engine "
                    f"{us['engine']:.0f} + adapter {us['stepd'] - us['engine']:.0f}; "
                    f"echo app {us['echo']:.0f} us"
                )

    asyncio.run(run())


def precision_section(tmp: Path, n: int) -> None:
    """A step of ``n`` elements with bfloat16 gradients (the parameter back in bfloat16)
    against the same step in float32, interleaved (goal <= 0.55x the float32 time)."""
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal(n).astype(np.float32)
    bf16 = narrow(np, f32, BF16)
    with (
        Server(tmp / "ckpt-precision") as server,
        httpx.Client(base_url=server.url, timeout=300) as c,
    ):
        for name in ("f32", "bf16"):
            body = {"name": name, "shape": [n], "group": {"algorithm": "adamw"}}
            assert c.post("/v1/runs/t/params", json=body).status_code == 201

        def step_f32() -> None:
            r = c.post("/v1/runs/t/params/f32/step", content=f32.tobytes())
            assert r.status_code == 200
            assert len(r.content) == 4 * n

        def step_bf16() -> None:
            r = c.post(
                "/v1/runs/t/params/bf16/step",
                content=bf16.tobytes(),
                headers={DTYPE_HEADER: "bfloat16"},
            )
            assert r.status_code == 200
            assert len(r.content) == 2 * n

        times: dict[str, list[float]] = {"f32": [], "bf16": []}
        for _ in range(5):  # interleaved: the machine's mood is shared by both
            times["f32"] += timed(step_f32, 1)
            times["bf16"] += timed(step_bf16, 1)
    t32, t16 = statistics.median(times["f32"]), statistics.median(times["bf16"])
    print(
        f"{n:,}-element step over http: float32 {t32 * 1e3:.0f} ms, bfloat16 gradients "
        f"{t16 * 1e3:.0f} ms: {t16 / t32:.2f}x  (goal <= 0.55)"
    )


def checkpoint_section(tmp: Path, gb: float) -> None:
    from stepd.service.checkpoints import CheckpointDir
    from stepd.service.store import ParamStore

    n = int(gb * 1e9 / 12)  # AdamW: param + exp_avg + exp_avg_sq = 12 bytes per element
    store = ParamStore("cpu")
    store.register("w", (n,), None, "adamw", {})
    store.step({"w": np.ones(n, np.float32)})
    ckpts = CheckpointDir(tmp / "ckpt-bench")

    block = np.ones(n * 3, np.float32)
    path = tmp / "ckpt-bench" / "raw.bin"
    path.parent.mkdir(parents=True, exist_ok=True)

    def disk_write(block: np.ndarray = block) -> float:
        t = time.perf_counter()
        with open(path, "wb") as f:
            f.write(memoryview(block).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        seconds = time.perf_counter() - t
        path.unlink()
        return block.nbytes / seconds / 1e9

    disk = max(disk_write() for _ in range(3))  # the disk's best, so the ratio is not flattered
    del block

    t = time.perf_counter()
    info = store.write_snapshot(lambda tensors, meta: ckpts.save(tensors, meta, "bench"))
    save = info.bytes / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    store.restore(*ckpts.load("bench"))
    restore = info.bytes / (time.perf_counter() - t) / 1e9
    print(
        f"checkpoint of {info.bytes / 1e9:.2f} GB: disk write (fsync) {disk:.2f} GB/s, "
        f"save {save:.2f} GB/s ({save / disk:.2f}x, goal >= 0.8), restore {restore:.2f} GB/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint-gb", type=float, default=1.0)
    parser.add_argument("--precision-elements", type=int, default=1 << 26)
    parser.add_argument(
        "--only", choices=("http", "asgi", "precision", "checkpoint"), help="run one section"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "http"):
            http_section(Path(tmp))
        if args.only in (None, "asgi"):
            asgi_section(Path(tmp))
        if args.only in (None, "precision"):
            precision_section(Path(tmp), args.precision_elements)
        if args.only in (None, "checkpoint"):
            checkpoint_section(Path(tmp), args.checkpoint_gb)


if __name__ == "__main__":
    main()
