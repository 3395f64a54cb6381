"""RemoteOptimizer training iterations (zero_grad + forward + backward + step) against local
torch, with the steps sent from backward (``overlap=True``) and without, measured in the
same run, interleaved iteration by iteration.

    python bench/torch_overlap.py [--rounds 3] [--iters 8] [--bucket-cap-mb 25 ...]

Models: an 8.4M-parameter MLP (1024 -> 2048 -> 2048 -> 1024, batch 64) and a 3.2M-parameter
``nn.TransformerEncoder`` (4 layers, d_model 256, 8 heads, ff 1024, batch 8 x 64 tokens).
Anchor: the same model with ``torch.optim.AdamW(fused=True)`` in process (float32; for the
bfloat16 rows a bfloat16 model with the same optimizer). Goals: shm:// <= 1.1x, http:// with
bfloat16 gradients <= 3x. Per row: the median over rounds of each round's median iteration,
its ratio to the anchor of the same round, the part of the iteration spent in ``step()``
(what backward did not hide), and the CPU time of the iteration in this process and the
server together (what overlap cannot hide where backward already keeps every core busy).
``fwd+bwd only`` is the floor: no optimizer at all. Below each table, a bare ASGI echo of the
bf16 gradients' bytes through the same uvicorn (``bench/echo_app.py``): what the HTTP stack
alone costs, added to the bf16 anchor's iteration without its step, is the http:// bf16
rows' floor.

One ``stepd serve --shm-socket`` process (CPU) serves both shm:// and http://.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stepd.client.torch import RemoteOptimizer  # noqa: E402

from bench.service import start_echo  # noqa: E402
from tests.support.server import Server  # noqa: E402

HP: dict[str, Any] = {"lr": 1e-4, "weight_decay": 0.01}
SERVER_PID = 0  # the server's CPU time counts too: on two cores it is not free


def _cpu() -> float:
    """CPU seconds used so far by this process and the server (every thread)."""
    t = os.times()
    used = t.user + t.system
    if SERVER_PID:
        with open(f"/proc/{SERVER_PID}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        used += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used


def mlp() -> tuple[torch.nn.Module, torch.Tensor]:
    net = torch.nn.Sequential(
        torch.nn.Linear(1024, 2048),
        torch.nn.GELU(),
        torch.nn.Linear(2048, 2048),
        torch.nn.GELU(),
        torch.nn.Linear(2048, 1024),
    )
    return net, torch.randn(64, 1024)


def encoder() -> tuple[torch.nn.Module, torch.Tensor]:
    layer = torch.nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0, batch_first=True)
    net = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
    return net, torch.randn(8, 64, 256)


MODELS: dict[str, Callable[[], tuple[torch.nn.Module, torch.Tensor]]] = {
    "MLP 8.4M": mlp,
    "TransformerEncoder 3.2M": encoder,
}


class Row:
    """One configuration: its own model (same init) and optimizer, kept over the rounds."""

    def __init__(
        self,
        label: str,
        build: Callable[[], tuple[torch.nn.Module, torch.Tensor]],
        dtype: torch.dtype,
        make_opt: Callable[[torch.nn.Module], Any] | None,
        anchor: str,
    ) -> None:
        torch.manual_seed(0)
        net, x = build()
        self.net, self.x = net.to(dtype), x.to(dtype)
        self.label, self.anchor = label, anchor
        self.opt = make_opt(self.net) if make_opt is not None else None
        self.iters: list[float] = []  # per round: median iteration
        self.steps: list[float] = []  # per round: median time in step()
        self.cpu: list[float] = []  # per round: median CPU seconds, this process + server

    def iteration(self) -> tuple[float, float, float]:
        cpu = _cpu()
        start = time.perf_counter()
        if self.opt is not None:
            self.opt.zero_grad()
        else:
            self.net.zero_grad()
        self.net(self.x).float().square().mean().backward()
        mid = time.perf_counter()
        if self.opt is not None:
            self.opt.step()
        end = time.perf_counter()
        return end - start, end - mid, _cpu() - cpu

    def keep(self, times: list[tuple[float, float, float]]) -> None:
        self.iters.append(statistics.median(t for t, _, _ in times))
        self.steps.append(statistics.median(s for _, s, _ in times))
        self.cpu.append(statistics.median(c for _, _, c in times))

    def close(self) -> None:
        if isinstance(self.opt, RemoteOptimizer):
            self.opt.close()


def rows_for(name: str, shm_url: str, http_url: str, caps: list[float]) -> list[Row]:
    build = MODELS[name]
    f32, bf16 = torch.float32, torch.bfloat16

    def fused(net: torch.nn.Module) -> Any:
        return torch.optim.AdamW(net.parameters(), fused=True, **HP)

    def remote(url: str, overlap: bool, cap: float = 25.0) -> Callable[[torch.nn.Module], Any]:
        def make(net: torch.nn.Module) -> Any:
            return RemoteOptimizer(
                net.named_parameters(), url, "adamw", overlap=overlap, bucket_cap_mb=cap, **HP
            )

        return make

    rows = [
        Row("torch fused AdamW fp32 (anchor)", build, f32, fused, "f32"),
        Row("fwd+bwd only fp32", build, f32, None, "f32"),
        Row("shm:// fp32", build, f32, remote(shm_url, False), "f32"),
    ]
    rows += [
        Row(f"shm:// fp32 overlap {cap:g} MB", build, f32, remote(shm_url, True, cap), "f32")
        for cap in caps
    ]
    rows += [
        Row("torch fused AdamW bf16 (anchor)", build, bf16, fused, "bf16"),
        Row("http:// bf16", build, bf16, remote(http_url, False), "bf16"),
    ]
    rows += [
        Row(f"http:// bf16 overlap {cap:g} MB", build, bf16, remote(http_url, True, cap), "bf16")
        for cap in caps
    ]
    rows += [
        Row("http:// fp32", build, f32, remote(http_url, False), "f32"),
        Row(
            f"http:// fp32 overlap {caps[0]:g} MB",
            build,
            f32,
            remote(http_url, True, caps[0]),
            "f32",
        ),
    ]
    return rows


def echo_floor(echo_url: str, nbytes: int, repeat: int) -> float:
    """Median seconds for the bare ASGI echo (bench/echo_app.py, the same uvicorn) to take
    ``nbytes`` and send them back: what the HTTP stack alone costs an http:// step of them."""
    body = bytes(nbytes)
    times = []
    with httpx.Client(timeout=60) as client:
        client.post(echo_url, content=body).read()  # the connection, warm
        for _ in range(repeat):
            start = time.perf_counter()
            r = client.post(echo_url, content=body)
            if len(r.content) != nbytes:
                raise RuntimeError("the echo sent back other bytes")
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, rows: list[Row], rounds: int, iters: int, echo_url: str) -> None:
    anchors = {"f32": rows[0], "bf16": next(r for r in rows if r.anchor == "bf16")}
    for row in rows:  # warm-up: registration, first state, the shm segments
        row.iteration()
    for _ in range(rounds):
        times: list[list[tuple[float, float, float]]] = [[] for _ in rows]
        for _ in range(iters):  # interleaved by iteration: every row sees the same load
            for row, out in zip(rows, times, strict=True):
                out.append(row.iteration())
        for row, out in zip(rows, times, strict=True):
            row.keep(out)
    params = sum(p.numel() for p in rows[0].net.parameters())
    print(f"\n{name} ({params / 1e6:.1f}M parameters), {iters} iterations x {rounds} rounds:")
    print(
        f"  {'':40s} {'iteration':>10s} {'ratio':>6s} {'spread':>13s} {'in step()':>10s}"
        f" {'CPU':>9s}"
    )
    for row in rows:
        anchor = anchors[row.anchor]
        ratios = [t / a for t, a in zip(row.iters, anchor.iters, strict=True)]
        print(
            f"  {row.label:40s} {statistics.median(row.iters) * 1e3:8.1f} ms"
            f" {statistics.median(ratios):5.2f}x  {min(ratios):5.2f}-{max(ratios):5.2f}x"
            f" {statistics.median(row.steps) * 1e3:7.1f} ms"
            f" {statistics.median(row.cpu) * 1e3:6.0f} ms"
        )
    # The floor of the http:// bf16 rows: the bf16 anchor's iteration without its step, plus
    # a bare echo of the gradients' bytes (the parameters come back in as many).
    bf16 = anchors["bf16"]
    echo = echo_floor(echo_url, 2 * params, iters)
    floor = statistics.median(bf16.iters) - statistics.median(bf16.steps) + echo
    print(
        f"  bare ASGI echo of the bf16 gradients ({2 * params / 1e6:.1f} MB each way)"
        f" {echo * 1e3:6.1f} ms: the http:// bf16 floor is"
        f" {floor / statistics.median(bf16.iters):.2f}x the bf16 anchor"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--bucket-cap-mb", type=float, nargs="+", default=[4.0, 25.0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, help="torch.set_num_threads here (not the server)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="stepd-bench-"))
    sock = tmp / "stepd.sock"
    echo, echo_url = start_echo()
    try:
        with Server(tmp / "ckpt", STEPD_SHM_SOCKET=str(sock)) as server:
            global SERVER_PID
            SERVER_PID = server.proc.pid
            print(
                f"stepd serve (cpu) with --shm-socket {sock}; {os.cpu_count()} CPUs, "
                f"torch {torch.__version__} with {torch.get_num_threads()} threads"
            )
            for name in args.models:
                rows = rows_for(name, f"shm://{sock}", server.url, args.bucket_cap_mb)
                try:
                    bench(name, rows, args.rounds, args.iters, echo_url)
                finally:
                    for row in rows:
                        row.close()
    finally:
        echo.terminate()
        echo.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
