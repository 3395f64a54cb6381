"""``stepd demo``: the whole system at work in under a minute.

It starts ``stepd serve`` in the background (CPU, a free loopback port, a temporary
checkpoint directory, and the shared-memory transport on a Unix socket next to it), then
launches worker processes that train a small classifier on scikit-learn's bundled digits,
data-parallel: each worker computes gradients on its own slice of every batch and sends them
with ``stepd.connect(url, run="demo", worker=..., workers={"mode": "sync", ...})``; the server
averages the workers' gradients, steps once per iteration and returns the same parameters to
all of them. The workers alternate transports in one sync group: even ranks use ``shm://`` (same
host, shared memory), odd ranks ``http://``. The demo shows the loss per iteration, then the
held-out accuracy of the parameters the server holds, and where to look.

``--mode async``: each gradient is applied as it arrives (``max_staleness`` 1); a gradient
computed from parameters more than 1 version old is refused and its worker continues from
the fresh parameters the refusal carries. The demo ends with each worker's accepted
fraction. ``--mode elastic``: sync iterations whose membership changes: the last worker
leaves a third of the way in and rejoins at two thirds (pulling the run's parameters), and
the rounds in between average over the workers present.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, TextIO, TypedDict

import numpy as np

SHAPES = {"fc1.weight": (64, 32), "fc1.bias": (32,), "fc2.weight": (32, 10), "fc2.bias": (10,)}


class _Hyperparams(TypedDict):
    lr: float
    weight_decay: float


HYPERPARAMS: _Hyperparams = {"lr": 1e-2, "weight_decay": 1e-4}
RUN = "demo"  # the named run the workers share
MODES = ("sync", "async", "elastic")
MAX_STALENESS = 1  # --mode async: a gradient at most this many versions behind is applied


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], data.target[order]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def forward(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple[float, float, dict]:
    """Cross-entropy loss, accuracy and gradients of a 64-32-10 ReLU MLP."""
    h_pre = x @ p["fc1.weight"] + p["fc1.bias"]
    h = np.maximum(h_pre, 0)
    logits = h @ p["fc2.weight"] + p["fc2.bias"]
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(probs[np.arange(n), y] + 1e-12).mean())
    acc = float((probs.argmax(axis=1) == y).mean())
    d = probs
    d[np.arange(n), y] -= 1
    d /= n
    dh = (d @ p["fc2.weight"].T) * (h_pre > 0)
    grads = {
        "fc2.weight": h.T @ d,
        "fc2.bias": d.sum(0),
        "fc1.weight": x.T @ dh,
        "fc1.bias": dh.sum(0),
    }
    return loss, acc, {k: np.ascontiguousarray(v, np.float32) for k, v in grads.items()}


def _initial_params() -> dict[str, np.ndarray]:
    # Whichever worker registers a parameter first sets its value and the others receive the
    # server's copy, so they would agree anyway; one seed makes the run the same every time.
    rng = np.random.default_rng(0)
    return {
        name: (rng.standard_normal(shape) * np.sqrt(2 / shape[0])).astype(np.float32)
        if len(shape) == 2
        else np.zeros(shape, np.float32)
        for name, shape in SHAPES.items()
    }


def _slice(x: np.ndarray, it: int, batch: int, rank: int, count: int) -> np.ndarray:
    """This worker's rows of batch ``it`` (the same permutation in every worker)."""
    order = np.random.default_rng(0).permutation(len(x))
    start = (it * batch) % (len(x) - batch)
    return order[start : start + batch][rank::count]


def worker(
    url: str,
    rank: int,
    count: int,
    iterations: int,
    batch: int,
    losses: Any,
    mode: str = "sync",
    rejoined: Any = None,
) -> None:
    """One data-parallel worker: its slice of each batch, one step per iteration. Puts
    ``(rank, iteration, loss)`` per iteration, then ``(rank, -1, stale gradients)``."""
    from stepd.client import connect

    x, y, _, _ = digits()
    params = _initial_params()
    hyperparams: dict[str, Any] = dict(HYPERPARAMS)
    if mode == "async":
        # no iterations to end: each parameter counts its own steps (Adam's bias correction)
        workers: dict[str, Any] = {"mode": "async", "max_staleness": MAX_STALENESS}
        hyperparams["step_count"] = "per_param"
    elif mode == "elastic":  # no fixed count: the members of each iteration
        workers = {"mode": "sync", "lease_s": 10.0, "timeout_s": 60}
    else:
        workers = {"mode": "sync", "count": count, "timeout_s": 60}
    with connect(
        url, "adamw", run=RUN, worker=f"worker-{rank}", workers=workers, **hyperparams
    ) as opt:
        if mode == "elastic":
            _elastic(opt, params, x, y, rank, count, iterations, batch, losses, rejoined)
        else:
            for it in range(iterations):
                loss, _, grads = forward(params, *_rows(x, y, it, batch, rank, count))
                losses.put((rank, it, loss))
                opt.step_batch([(name, p.shape, p, grads[name]) for name, p in params.items()])
                if mode == "sync":
                    opt.end_iteration()
        losses.put((rank, -1, opt.stale_gradients // len(SHAPES)))  # a refusal is per step


def _rows(
    x: np.ndarray, y: np.ndarray, it: int, batch: int, rank: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
    idx = _slice(x, it, batch, rank, count)
    return x[idx], y[idx]


def _elastic(
    opt: Any,
    params: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    rank: int,
    count: int,
    iterations: int,
    batch: int,
    losses: Any,
    rejoined: Any,
) -> None:
    """The run's global step says which batch comes next; the last worker leaves after a
    third of the iterations and joins again at two thirds. The others hold at two thirds
    until it is about to join (``rejoined``, an event): otherwise, on a fast machine, they
    could finish before it sees the step it waits for."""
    leaver = rank == count - 1
    away: tuple[int, int] = (iterations // 3, 2 * iterations // 3)
    info = joined = opt.join()
    # No count: an iteration starts with whoever is a member. The first one waits for all,
    # as a launcher would; a worker that was late anyway joins from the next iteration.
    deadline = time.monotonic() + 30
    while not info["started"] and len(info["members"]) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        info = opt.heartbeat()
    it = joined.get("member_from", info["iteration"]) - 1
    while it < iterations:
        if leaver and it == away[0]:
            opt.leave()
            while _global_step(opt) < away[1]:  # the others train meanwhile
                time.sleep(0.05)
            # join() returns once the iteration it joins begins: let the others go on first
            # (it joins the iteration they are about to run, or the one after)
            rejoined.set()
            it = opt.join()["member_from"] - 1
            opt.pull_all()  # its copy is old: continue from the run's parameters
            continue
        if not leaver and it == away[1]:
            rejoined.wait(30)
        loss, _, grads = forward(params, *_rows(x, y, it, batch, rank, count))
        losses.put((rank, it, loss))
        opt.step_batch([(name, p.shape, p, grads[name]) for name, p in params.items()])
        it = opt.end_iteration()
    opt.leave()  # done: nothing waits for this worker any more


def _global_step(opt: Any) -> int:
    return int(opt.state_dict()["global_step"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(port: int, checkpoints: str, shm_socket: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "stepd.service.cli",
        "serve",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--checkpoint-dir",
        checkpoints,
        "--shm-socket",
        shm_socket,
        "--log-level",
        "warning",
    ]
    # Its output goes to a file next to the checkpoints: a pipe nobody reads while it serves
    # (--keep-serving) would block the server once its log filled the pipe's buffer.
    log_path = os.path.join(os.path.dirname(checkpoints), "server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path, errors="replace") as log_text:
                raise RuntimeError(f"the server exited: {log_text.read()}")
        try:
            healthy = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
            if healthy.status_code == 200 and os.path.exists(shm_socket):
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not become healthy within 60 s")


def _spans(counts: list[int]) -> str:
    """``[3, 3, 2, 2, 3]`` as ``1-2: 3, 3-4: 2, 5: 3`` (iterations from 1)."""
    parts: list[str] = []
    start = 0
    for i in range(1, len(counts) + 1):
        if i == len(counts) or counts[i] != counts[start]:
            span = f"{start + 1}" if i == start + 1 else f"{start + 1}-{i}"
            parts.append(f"{span}: {counts[start]}")
            start = i
    return ", ".join(parts)


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = width * done // total
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def progress(done: int, total: int, loss: float, out: TextIO) -> None:
    """One iteration's progress. A terminal redraws the bar in place (a line kept every 10
    iterations); a pipe or a file gets only those kept lines — each redraw would otherwise
    be one more copy of the bar in a log."""
    kept = done % 10 == 0 or done == total
    line = f"  {_bar(done, total)}  loss {loss:.4f}"
    if out.isatty():
        print(line, end="\n" if kept else "\r", file=out, flush=True)
    elif kept:
        print(line, file=out, flush=True)


def run_demo(
    workers: int = 3,
    iterations: int = 60,
    batch: int = 96,
    keep: bool = False,
    mode: str = "sync",
) -> int:
    import httpx

    if not 2 <= workers <= 4:
        raise SystemExit("--workers must be 2, 3 or 4")
    if mode not in MODES:
        raise SystemExit(f"--mode must be one of {', '.join(MODES)}")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = tempfile.mkdtemp(prefix="stepd-demo-")  # short: a socket path has <= 107 bytes
    checkpoints = os.path.join(tmp, "checkpoints")
    os.mkdir(checkpoints)
    shm_socket = os.path.join(tmp, "stepd.sock")
    shm_url = f"shm://{shm_socket}"
    print(f"stepd demo: a server on {url} and {shm_url},")
    print(f"  {workers} worker processes, data-parallel AdamW")
    print(
        {
            "sync": "  (sync mode: every iteration the server averages the workers' gradients)",
            "async": "  (async mode: each gradient is applied on arrival, at most "
            f"{MAX_STALENESS} versions stale)",
            "elastic": f"  (elastic sync: worker-{workers - 1} leaves after iteration "
            f"{iterations // 3} and joins again after {2 * iterations // 3})",
        }[mode]
    )
    urls = [shm_url if r % 2 == 0 else url for r in range(workers)]
    for r, u in enumerate(urls):
        kind = "shm:// (shared memory)" if u.startswith("shm://") else "http://"
        print(f"  worker-{r}: {kind}")
    print()
    server = _start_server(port, checkpoints, shm_socket)
    try:
        ctx = multiprocessing.get_context("spawn")
        losses = ctx.Queue()
        rejoined = ctx.Event()
        procs = [
            ctx.Process(
                target=worker,
                args=(urls[r], r, workers, iterations, batch, losses, mode, rejoined),
            )
            for r in range(workers)
        ]
        for p in procs:
            p.start()
        per_iteration: dict[int, list[float]] = {}
        members: dict[int, int] = {}  # elastic: how many workers took part in each iteration
        stale: dict[int, int] = {}
        shown = 0
        while len(stale) < workers:
            try:
                rank, it, value = losses.get(timeout=1)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"workers failed with exit codes {dead}") from None
                continue
            if it < 0:
                stale[rank] = int(value)
                continue
            members[it] = members.get(it, 0) + 1
            if it < shown:  # a loss that came after its iteration was shown
                continue
            per_iteration.setdefault(it, []).append(value)
            # An elastic iteration has as many losses as members: it is complete once a later
            # one has begun (its members put their losses before their gradients).
            while per_iteration.get(shown) and (
                len(per_iteration[shown]) == workers or (mode == "elastic" and it > shown)
            ):
                mean = float(np.mean(per_iteration.pop(shown)))
                shown += 1
                progress(shown, iterations, mean, sys.stdout)
        for p in procs:
            p.join(60)
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"workers failed with exit codes {failed}")
        while per_iteration.get(shown):  # the last iterations of an elastic run
            shown += 1
            progress(shown, iterations, float(np.mean(per_iteration.pop(shown - 1))), sys.stdout)
        if mode == "async":
            print("\naccepted gradients (the rest came stale: their workers continued from fresh")
            print(f"parameters; max_staleness {MAX_STALENESS}):")
            for rank in sorted(stale):
                refused = stale[rank] / iterations
                print(f"  worker-{rank}: {1 - refused:.0%} accepted, {refused:.0%} stale")
        elif mode == "elastic":
            print("\nworkers per iteration: " + _spans([members[i] for i in sorted(members)]))

        _, _, x_test, y_test = digits()
        served = {
            name: np.frombuffer(
                httpx.get(f"{url}/v1/runs/{RUN}/params/{name}/value").content, np.float32
            ).reshape(shape)
            for name, shape in SHAPES.items()
        }
        _, acc, _ = forward(served, x_test, y_test)
        status = httpx.get(f"{url}/v1/runs/{RUN}").json()
        step = status["global_step"]
        print(
            f"\nheld-out accuracy of the served parameters: {acc:.1%} "
            f"(global step {step}, {status['params']} parameters)"
        )
        print("where to look:")
        run = f"{url}/v1/runs/{RUN}"
        places = [
            (f"{url}/", "the dashboard"),
            (f"{url}/docs", "the API"),
            (f"{run}/params", "what the run holds"),
            (f"{run}/params/fc1.weight/stats", "per-slot statistics"),
            (f"{run}/workers", "who trained"),
            (f"{url}/metrics", "Prometheus metrics"),
        ]
        width = max(len(where) for where, _ in places)
        for where, what in places:
            print(f"  {where:<{width}}  {what}")
        if keep:
            print("serving until Ctrl-C ...")
            with contextlib.suppress(KeyboardInterrupt):
                server.wait()
        else:
            print("(this server stops now; `stepd demo --keep-serving` keeps it up)")
        return 0 if acc >= 0.85 else 1
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
