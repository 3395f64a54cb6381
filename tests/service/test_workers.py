"""Distributed workers against the real server: sync rounds, async staleness, bookkeeping."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time

import httpx
import numpy as np
import pytest
from stepd.kernels import create_optimizer

from tests.support import sync_worker
from tests.support.server import Server

pytestmark = pytest.mark.e2e  # starts real server processes

WORKERS = ["w0", "w1", "w2", "w3"]


def _register(c: httpx.Client, name: str, shape, algorithm: str, hp: dict, workers: dict) -> None:
    body = {
        "name": name,
        "shape": list(shape),
        "group": {"algorithm": algorithm, "hyperparams": hp, "workers": workers},
    }
    r = c.post("/v1/runs/t/params", json=body)
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    ("algorithm", "hp", "specs"),
    [
        ("adamw", {"lr": 1e-2, "weight_decay": 0.01}, {"w": (16, 8), "b": (8,)}),
        ("muon", {"lr": 2e-2, "adamw_lr": 1e-2}, {"w": (12, 20), "b": (20,)}),
    ],
)
def test_sync_four_worker_processes_equal_one_averaging_process(tmp_path, algorithm, hp, specs):
    steps = 6
    with Server(tmp_path) as server:
        with httpx.Client(base_url=server.url) as c:
            for name, shape in specs.items():
                _register(c, name, shape, algorithm, hp, {"mode": "sync", "count": 4})
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(4) as pool:
            results = pool.starmap(
                sync_worker.run, [(server.url, w, steps, specs) for w in WORKERS]
            )
        with httpx.Client(base_url=server.url) as c:
            assert c.get("/v1/runs/t").json()["global_step"] == steps
            seen = sorted(w["id"] for w in c.get("/v1/runs/t/workers").json())
            assert seen == WORKERS
    for other in results[1:]:
        assert other == results[0]  # every worker got the same parameter bytes

    local = create_optimizer(algorithm, backend="cpu", **hp)
    params = {n: np.zeros(s, np.float32) for n, s in specs.items()}
    for step in range(steps):
        for name, shape in specs.items():
            total = np.zeros(shape, np.float32)
            for w in WORKERS:  # the server sums in worker-id order, then divides
                total += sync_worker.gradient(w, step, shape)
            local.step(name, shape, params[name], total / np.float32(4))
        local.end_iteration()
    for name, shape in specs.items():
        served = np.frombuffer(results[0][name], np.float32).reshape(shape)
        np.testing.assert_allclose(served, params[name], rtol=1e-6, atol=1e-7)


def test_sync_refuses_duplicates_and_times_out_stragglers(tmp_path) -> None:
    with Server(tmp_path) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        _register(c, "w", (4,), "sgd", {"lr": 0.1}, {"mode": "sync", "count": 3, "timeout_s": 1})
        g = np.ones(4, np.float32).tobytes()
        assert c.post("/v1/runs/t/params/w/step", content=g).status_code == 422  # no worker id
        results: dict[str, httpx.Response] = {}

        def send(worker: str) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as own:
                results[worker] = own.post(f"/v1/runs/t/params/w/step?worker={worker}", content=g)

        threads = [threading.Thread(target=send, args=(w,)) for w in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results.values():  # only 2 of 3 came: the round fails for both
            assert r.status_code == 504
            assert "straggler timeout" in r.json()["detail"]
            assert "2 of 3 workers" in r.json()["detail"]
        value = np.frombuffer(c.get("/v1/runs/t/params/w/value").content, np.float32)
        np.testing.assert_array_equal(value, np.zeros(4, np.float32))  # nothing applied
        assert c.get("/v1/runs/t/params/w").json()["version"] == 0

        # A complete round, then a worker sending twice / for a finished iteration.
        results.clear()
        threads = [threading.Thread(target=send, args=(w,)) for w in ("a", "b", "c")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert {r.status_code for r in results.values()} == {200}
        r = c.post("/v1/runs/t/params/w/step?worker=a&iteration=1", content=g)
        assert r.status_code == 409
        assert "iteration 1 is already done" in r.json()["detail"]
        r = c.post("/v1/runs/t/params/w/step?worker=a&iteration=5", content=g)
        assert r.status_code == 409
        assert "has not started" in r.json()["detail"]


def test_sync_groups_share_one_worker_count(tmp_path) -> None:
    with Server(tmp_path) as server, httpx.Client(base_url=server.url) as c:
        _register(c, "a", (2,), "sgd", {}, {"mode": "sync", "count": 2})
        body = {
            "name": "b",
            "shape": [2],
            "group": {"algorithm": "adam", "workers": {"mode": "sync", "count": 3}},
        }
        r = c.post("/v1/runs/t/params", json=body)
        assert r.status_code == 409
        assert "share one worker count" in r.json()["detail"]
        body["group"]["workers"] = {"mode": "sync"}
        assert "count" in c.post("/v1/runs/t/params", json=body).json()["detail"]


def test_async_workers_no_lost_update_and_stale_gradients_answered_fresh(tmp_path) -> None:
    n_workers, steps, bound = 8, 500, 3
    with Server(tmp_path) as server:
        with httpx.Client(base_url=server.url) as c:
            _register(
                c, "w", (64,), "sgd", {"lr": 2.0**-12}, {"mode": "async", "max_staleness": bound}
            )
        accepted = [0] * n_workers
        stale = [0] * n_workers
        errors: list[str] = []

        def work(i: int) -> None:
            g = np.ones(64, np.float32).tobytes()
            with httpx.Client(base_url=server.url, timeout=30) as c:
                version = 0
                for _ in range(steps):
                    r = c.post(f"/v1/runs/t/params/w/step?worker=a{i}&version={version}", content=g)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text}")
                        continue
                    applied = r.headers["x-stepd-applied"] == "true"
                    if applied == ("x-stepd-stale" in r.headers):
                        errors.append(f"applied {applied} with headers {dict(r.headers)}")
                    accepted[i] += applied
                    stale[i] += not applied
                    # applied or not, the reply is the parameter at this version: go on from it
                    version = int(r.headers["x-stepd-version"])
                    value = np.frombuffer(r.content, np.float32)
                    if not np.all(value == np.float32(-(2.0**-12) * version)):  # exact
                        errors.append(f"value {value[0]} is not the one of version {version}")

        threads = [threading.Thread(target=work, args=(i,)) for i in range(n_workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with httpx.Client(base_url=server.url) as c:
            info = c.get("/v1/runs/t/params/w").json()
            assert info["version"] == sum(accepted)  # every accepted gradient applied once
            value = np.frombuffer(c.get("/v1/runs/t/params/w/value").content, np.float32)
            np.testing.assert_array_equal(value, np.float32(-(2.0**-12) * sum(accepted)))
            metrics = c.get("/metrics").text
            assert f'stepd_stale_rejected_total{{run="t"}} {float(sum(stale))}' in metrics
            assert "stepd_gradient_staleness_bucket" in metrics
            # Explicitly stale (answered with the current value, nothing applied), and from the
            # future (an error):
            r = c.post(
                "/v1/runs/t/params/w/step?version=0", content=np.ones(64, np.float32).tobytes()
            )
            assert r.status_code == 200
            assert r.headers["x-stepd-applied"] == "false"
            assert r.headers["x-stepd-stale"] == "true"
            assert int(r.headers["x-stepd-version"]) == info["version"]
            assert r.content == value.tobytes()
            r = c.post(
                f"/v1/runs/t/params/w/step?version={info['version'] + 5}",
                content=np.ones(64, np.float32).tobytes(),
            )
            assert r.status_code == 422
            r = c.post("/v1/runs/t/params/w/step", content=np.ones(64, np.float32).tobytes())
            assert r.status_code == 422
            assert "async group" in r.json()["detail"]
            assert c.get("/v1/runs/t/params/w").json()["version"] == info["version"]


def test_a_sync_round_of_256_http_workers_holds_no_threads(tmp_path) -> None:
    """Waiting for a round holds no server thread (the pool has 40): 256 workers complete
    two rounds and their barriers, and the server answers other requests meanwhile."""
    n = 256
    rng = np.random.default_rng(0)
    grads = rng.standard_normal((n, 8)).astype(np.float32)

    async def run(c: httpx.AsyncClient, workers: list[str]) -> list[httpx.Response]:
        async def one(i: int, w: str) -> httpx.Response:
            r = await c.post(f"/v1/runs/t/params/w/step?worker={w}", content=grads[i].tobytes())
            assert r.status_code == 200, r.text
            return await c.post(f"/v1/runs/t/iteration/end?worker={w}")

        return await asyncio.gather(*(one(i, w) for i, w in enumerate(workers)))

    async def main(url: str) -> tuple[float, np.ndarray]:
        # Idle connections are dropped by the client before uvicorn's 5 s keep-alive timeout
        # closes them under it (a reused, just-closed connection is a ReadError).
        limits = httpx.Limits(max_connections=n + 8, keepalive_expiry=1.0)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
            workers = [f"w{i:03d}" for i in range(n)]
            # A round short of one worker: all 255 wait, and the server still answers.
            waiting = asyncio.gather(
                *(
                    c.post(f"/v1/runs/t/params/w/step?worker={w}", content=grads[i].tobytes())
                    for i, w in enumerate(workers[:-1])
                )
            )
            await asyncio.sleep(1.0)
            assert (await c.get("/v1/runs/t/checkpoints")).status_code == 200
            assert (await c.post("/v1/runs/t/checkpoints", json={"name": "mid"})).status_code == 201
            last = await c.post(
                f"/v1/runs/t/params/w/step?worker={workers[-1]}", content=grads[-1].tobytes()
            )
            assert last.status_code == 200, last.text
            replies = await waiting
            assert {r.content for r in replies} == {last.content}  # one step, one value
            ends = await asyncio.gather(
                *(c.post(f"/v1/runs/t/iteration/end?worker={w}") for w in workers)
            )
            assert {r.json()["global_step"] for r in ends} == {1}
            start = time.perf_counter()
            ends = await run(c, workers)  # a second round and barrier, timed
            seconds = time.perf_counter() - start
            assert {r.json()["global_step"] for r in ends} == {2}
            start = time.perf_counter()  # the anchor: as many requests that wait for nothing
            await asyncio.gather(*(c.get("/healthz") for _ in range(2 * n)))
            anchor = time.perf_counter() - start
            value = (await c.get("/v1/runs/t/params/w/value")).content
            return seconds, anchor, np.frombuffer(value, np.float32)

    with Server(tmp_path) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        _register(c, "w", (8,), "sgd", {"lr": 0.5}, {"mode": "sync", "count": n, "timeout_s": 60})
        seconds, anchor, value = asyncio.run(main(server.url))
    mean = np.zeros(8, np.float32)
    for g in grads:  # the server sums in worker-id order, which is this order
        mean += g
    mean /= np.float32(n)
    np.testing.assert_array_equal(value, -np.float32(0.5) * mean * 2)
    print(
        f"256-worker sync round (step + barrier): {seconds * 1e3:.0f} ms, "
        f"{seconds / anchor:.2f}x as many /healthz requests at once"
    )
