"""Elastic sync membership through the client, over http:// and shm://: join, leave, a
lease that runs out, rejoining; and the HTTP routes' replies."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

from tests.support.clients import connect_shared
from tests.support.server import ShmServer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm"),
]


def _parallel(work: Callable[[str], Any], workers: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def guarded(w: str) -> None:
        try:
            out[w] = work(w)
        except Exception as exc:  # looked at by the test
            out[w] = exc

    threads = [threading.Thread(target=guarded, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    for w, result in out.items():
        assert not isinstance(result, Exception), (w, result)
    return out


@pytest.mark.parametrize("transport", ["http", "shm"])
def test_join_leave_drop_and_rejoin_through_the_client(transport) -> None:
    mode = {"mode": "sync", "count": 2, "lease_s": 1.0, "timeout_s": 20}
    with ShmServer() as srv:
        url = srv.url if transport == "http" else srv.shm_url
        # c stands for a worker whose process hangs: only its requests renew its lease
        opts = {
            w: connect_shared(url, "sgd", lr=1.0, worker=w, workers=mode, heartbeat=w != "c")
            for w in ("a", "b", "c")
        }
        params = {w: np.zeros(2, np.float32) for w in opts}
        try:

            def iteration(w: str, g: float) -> int:
                opts[w].step("p", (2,), params[w], np.full(2, g, np.float32))
                return opts[w].end_iteration()

            # iteration 1: a and b (the first workers join by stepping)
            assert opts["a"].join()["member_from"] == 1
            assert _parallel(lambda w: iteration(w, {"a": 1, "b": 3}[w]), ["a", "b"]) == {
                "a": 1,
                "b": 1,
            }
            np.testing.assert_array_equal(params["a"], [-2, -2])  # the mean of 1 and 3
            # c joins during iteration 2: it is a member from iteration 3
            started = threading.Event()

            def late(w: str) -> dict:
                started.set()
                return opts[w].join()

            joined: dict[str, Any] = {}
            t = threading.Thread(target=lambda: joined.update(_parallel(late, ["c"])))
            t.start()
            started.wait(5)
            assert _parallel(lambda w: iteration(w, 1.0), ["a", "b"]) == {"a": 2, "b": 2}
            t.join(10)
            assert joined["c"]["member_from"] == 3
            # iteration 3: b leaves; a and c step, c's copy came from the run (server wins)
            opts["b"].leave()
            params["c"][:] = 7  # its own init is ignored: the run's value wins
            _parallel(lambda w: iteration(w, {"a": 1, "c": 5}[w]), ["a", "c"])
            np.testing.assert_array_equal(params["c"], params["a"])
            np.testing.assert_array_equal(params["a"], [-6, -6])  # -2 - 1 - mean(1, 5)
            # iteration 4: c goes silent; its lease runs out and a finishes alone
            assert iteration("a", 2.0) == 4
            assert opts["a"].dropped == ("c",)
            np.testing.assert_array_equal(params["a"], [-8, -8])
            # c rejoins: iteration 5 has not started (one member of the two it needs), so c
            # is a member of it at once
            assert opts["c"].join()["member_from"] == 5
            _parallel(lambda w: iteration(w, 1.0), ["a", "c"])
            assert opts["a"].dropped == ()
            info = httpx.get(f"{srv.url}/v1/runs/t/membership").json()
            assert info["members"] == ["a", "c"]
            assert info["iteration"] == 6
            beat = opts["a"].heartbeat()
            assert beat["lease_s"] == 1.0
            assert "member_from" not in beat  # only a join has one, over every transport
        finally:
            for opt in opts.values():
                opt.close()


def test_the_http_replies_name_dropped_workers() -> None:
    mode = {"mode": "sync", "lease_s": 1.5}
    body = {"name": "p", "shape": [2], "group": {"algorithm": "sgd", "workers": mode}}
    with ShmServer() as srv, httpx.Client(base_url=f"{srv.url}/v1/runs/t", timeout=30) as c:
        assert c.post("/params", json=body).status_code == 201
        for w in ("a", "b"):
            assert c.post(f"/workers/{w}/join").json()["member_from"] == 1
        g = np.ones(2, np.float32).tobytes()
        r = c.post("/params/p/step?worker=a", content=g)  # b never sends
        assert r.status_code == 200
        assert r.headers["x-stepd-dropped"] == "b"
        end = c.post("/iteration/end?worker=a").json()
        assert end == {"global_step": 1, "dropped": ["b"]}
        r = c.post("/workers/b/heartbeat")
        assert r.status_code == 409
        assert "join again" in r.json()["detail"]
        assert c.post("/workers/a/leave").json()["members"] == []
        assert c.post("/workers/bad id/join").status_code == 422


@pytest.mark.parametrize("transport", ["http", "shm"])
def test_last_lets_unused_parameters_go_on_without_the_worker(transport) -> None:
    """Worker b does not use q this iteration: its step_batch(..., last=True) says so, and q's
    round completes with a's gradient alone — before b ends the iteration (without ``last``
    the round would wait for b's end_iteration, which here waits for a: a 504)."""
    mode = {"mode": "sync", "count": 2, "timeout_s": 5}
    p0, q0 = np.zeros(3, np.float32), np.ones(2, np.float32)
    ga = {"p": np.full(3, 1.0, np.float32), "q": np.full(2, 4.0, np.float32)}
    gb = {"p": np.full(3, 3.0, np.float32)}
    a_done = threading.Event()
    with ShmServer() as srv:
        url = srv.url if transport == "http" else srv.shm_url
        run = f"last-{transport}"

        def work(w: str) -> dict[str, np.ndarray]:
            with connect_shared(url, "sgd", lr=0.5, worker=w, workers=mode, run=run) as opt:
                p, q = p0.copy(), q0.copy()
                if w == "a":
                    opt.step_batch([("p", p.shape, p, ga["p"]), ("q", q.shape, q, ga["q"])])
                    a_done.set()
                else:
                    opt.register("q", q.shape, q)
                    opt.step_batch([("p", p.shape, p, gb["p"])], last=True)
                    assert a_done.wait(10), "q's round waited for b"
                opt.end_iteration()
                return {"p": p, "q": q}

        out = _parallel(work, ["a", "b"])
    np.testing.assert_array_equal(out["a"]["p"], p0 - np.float32(0.5) * np.float32(2.0))
    np.testing.assert_array_equal(out["b"]["p"], out["a"]["p"])
    np.testing.assert_array_equal(out["a"]["q"], q0 - np.float32(0.5) * ga["q"])  # a's alone


@pytest.mark.parametrize("transport", ["http", "shm"])
def test_an_idle_worker_keeps_its_lease_by_heartbeats(transport) -> None:
    """After iteration 1 the workers go idle for 2.5 leases: a and b stay members, their
    sessions heartbeat while idle; c, connected with ``heartbeat=False`` (a hung worker), is
    dropped — the lease is real — and a and b go on without it."""
    mode = {"mode": "sync", "lease_s": 1.0, "timeout_s": 20}
    with ShmServer() as srv:
        url = srv.url if transport == "http" else srv.shm_url
        opts = {
            w: connect_shared(url, "sgd", lr=1.0, worker=w, workers=mode, heartbeat=w != "c")
            for w in "abc"
        }
        params = {w: np.zeros(2, np.float32) for w in opts}
        try:

            def iteration(w: str) -> int:
                opts[w].step("p", (2,), params[w], np.ones(2, np.float32))
                return opts[w].end_iteration()

            for opt in opts.values():
                assert opt.join()["member_from"] == 1
            assert _parallel(iteration, list(opts)) == {"a": 1, "b": 1, "c": 1}
            time.sleep(2.5)  # idle: longer than the lease, twice over
            info = httpx.get(f"{srv.url}/v1/runs/t/membership").json()
            assert info["members"] == ["a", "b"]
            assert info["dropped"] == ["c"]
            assert _parallel(iteration, ["a", "b"]) == {"a": 2, "b": 2}
            assert opts["a"].dropped == ("c",)
            np.testing.assert_array_equal(params["a"], [-2, -2])
        finally:
            for opt in opts.values():
                opt.close()
        time.sleep(2.0)  # closed: the heartbeats stopped, and the leases ran out
        assert httpx.get(f"{srv.url}/v1/runs/t/membership").json()["members"] == []
