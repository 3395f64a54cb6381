"""Distributed-worker modes over ``shm://``: the same behaviour as over http:// (test_workers)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
from stepd.client import InvalidRequestError, ServerError, connect

from tests.support.clients import connect_shared
from tests.support.server import ShmServer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm"),
]

SHAPES = {"a": (3,), "b": (2, 2)}


@pytest.fixture
def srv() -> Iterator[ShmServer]:
    with ShmServer() as s:
        yield s


def grad(worker: int, it: int, name: str) -> np.ndarray:
    rng = np.random.default_rng(1000 * worker + 10 * it + len(name))
    return rng.standard_normal(SHAPES[name]).astype(np.float32)


def run_threads(work: Callable[[int], None], count: int) -> None:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]


def test_sync_workers_over_shm_get_one_averaged_step(srv) -> None:
    count, iterations = 3, 4
    mode = {"mode": "sync", "count": count, "timeout_s": 20}
    results: dict[int, dict[str, np.ndarray]] = {}
    steps: dict[int, list[int]] = {}

    def work(i: int) -> None:
        with connect_shared(srv.shm_url, "adamw", lr=0.1, worker=f"w{i}", workers=mode) as opt:
            params = {n: np.full(s, i, np.float32) for n, s in SHAPES.items()}  # w0's wins
            opt.register("a", SHAPES["a"], params["a"])
            got = []
            for it in range(iterations):
                if it % 2:  # both paths: STEP_BATCH and single STEPs
                    opt.step_batch([(n, p.shape, p, grad(i, it, n)) for n, p in params.items()])
                else:
                    for n, p in params.items():
                        opt.step(n, p.shape, p, grad(i, it, n))
                got.append(opt.end_iteration())
            results[i], steps[i] = params, got

    # w0 registers first so that its initial value (zeros) is the one everyone starts from
    with connect_shared(srv.shm_url, "adamw", lr=0.1, worker="w0", workers=mode) as first:
        zeros = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
        for n, p in zeros.items():
            first.register(n, p.shape, p)
        run_threads(work, count)

    # one process stepping the average of the workers' gradients (summed in worker-id order)
    with connect("local://?backend=cpu", "adamw", lr=0.1) as ref:
        expect = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
        for it in range(iterations):
            for n, p in expect.items():
                total = np.zeros(SHAPES[n], np.float32)
                for i in range(count):
                    total += grad(i, it, n)
                total /= np.float32(count)
                ref.step(n, p.shape, p, total)
            ref.end_iteration()
    for i in range(count):
        assert steps[i] == [1, 2, 3, 4]
        for n in SHAPES:
            assert results[i][n].tobytes() == results[0][n].tobytes()
            assert results[i][n].tobytes() == expect[n].tobytes(), (i, n)
    seen = {w["id"]: w for w in httpx.get(f"{srv.url}/v1/runs/t/workers").json()}
    assert {f"w{i}" for i in range(count)} <= set(seen)
    assert seen["w1"]["gradients"] == iterations * len(SHAPES)


def test_sync_over_shm_and_http_in_one_group_see_the_same_bytes(srv) -> None:
    mode = {"mode": "sync", "count": 2}
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        url = srv.shm_url if i == 0 else srv.url
        with connect_shared(url, "sgd", lr=0.5, worker=f"w{i}", workers=mode) as opt:
            p = np.zeros(3, np.float32)
            for _ in range(4):
                opt.step("p", p.shape, p, np.full(3, i + 1, np.float32))  # grads 1 and 2
                opt.end_iteration()
            results[i] = p

    run_threads(work, 2)
    assert results[0].tobytes() == results[1].tobytes()
    np.testing.assert_array_equal(results[0], np.full(3, -0.5 * 1.5 * 4, np.float32))
    assert httpx.get(f"{srv.url}/v1/runs/t").json()["global_step"] == 4


def test_sync_over_shm_needs_a_worker_id_and_times_out_stragglers(srv) -> None:
    mode = {"mode": "sync", "count": 2, "timeout_s": 0.5}
    with connect_shared(srv.shm_url, "sgd", lr=1.0, workers=mode) as anon:
        p = np.zeros(2, np.float32)
        with pytest.raises(InvalidRequestError, match="sync group"):
            anon.step("p", (2,), p, np.ones(2, np.float32))
    with pytest.raises(InvalidRequestError, match="invalid worker id"):
        connect_shared(srv.shm_url, "sgd", lr=1.0, worker="no spaces", workers=mode)
    with connect_shared(srv.shm_url, "sgd", lr=1.0, worker="alone", workers=mode) as opt:
        p = np.zeros(2, np.float32)
        with pytest.raises(ServerError, match="straggler timeout") as info:
            opt.step("p", (2,), p, np.ones(2, np.float32))  # the other worker never comes
        assert info.value.status == 504
        np.testing.assert_array_equal(p, [0, 0])  # nothing applied, param untouched
        value = httpx.get(f"{srv.url}/v1/runs/t/params/p/value").content
        np.testing.assert_array_equal(np.frombuffer(value, np.float32), [0, 0])


def test_async_over_shm_refuses_stale_gradients_with_the_current_values(srv) -> None:
    mode = {"mode": "async", "max_staleness": 0}
    with (
        connect_shared(srv.shm_url, "sgd", lr=1.0, worker="a", workers=mode) as a,
        connect_shared(srv.shm_url, "sgd", lr=1.0, worker="b", workers=mode) as b,
    ):
        pa, pb = np.zeros(2, np.float32), np.zeros(2, np.float32)
        g = np.ones(2, np.float32)
        a.step("p", (2,), pa, g)  # registers p, steps it: version 1
        b.step("p", (2,), pb, g)  # the server's copy (v1) wins at registration; v2
        np.testing.assert_array_equal(pb, [-2, -2])
        a.step("p", (2,), pa, g)  # a's copy is from v1, the param is at v2: refused
        np.testing.assert_array_equal(pa, [-2, -2])  # not applied; a has the current value
        assert a.stale_gradients == 1
        value = httpx.get(f"{srv.url}/v1/runs/t/params/p/value").content
        np.testing.assert_array_equal(np.frombuffer(value, np.float32), [-2, -2])
        b.step("p", (2,), pb, g)  # b is current: v3
        np.testing.assert_array_equal(pb, [-3, -3])
        a.pull("p")  # a catches up without stepping
        np.testing.assert_array_equal(pa, [-3, -3])

        # the batch path (STEP_V with several slots) tracks versions the same way
        qa, qb = np.zeros(1, np.float32), np.zeros(1, np.float32)
        one = np.ones(1, np.float32)
        a.register("q", (1,), qa)
        b.register("q", (1,), qb)
        b.step_batch([("p", (2,), pb, g), ("q", (1,), qb, one)])  # p v4, q v1
        a.step_batch([("p", (2,), pa, g), ("q", (1,), qa, one)])  # p is stale for a: neither
        np.testing.assert_array_equal(pa, [-4, -4])  # applies; both are current in a now
        np.testing.assert_array_equal(qa, [-1])
        assert a.stale_gradients == 3
        b.step_batch([("p", (2,), pb, g), ("q", (1,), qb, one)])  # current: p v5, q v2
        np.testing.assert_array_equal(pb, [-5, -5])
        np.testing.assert_array_equal(qb, [-2])
        a.step_batch([("p", (2,), pa, g), ("q", (1,), qa, one)])  # stale again: refreshed
        a.step_batch([("p", (2,), pa, g), ("q", (1,), qa, one)])  # from v5, v2: applied
        np.testing.assert_array_equal(pa, [-6, -6])
        np.testing.assert_array_equal(qa, [-3])
        assert a.stale_gradients == 5
    params = {p["name"]: p for p in httpx.get(f"{srv.url}/v1/runs/t/params").json()}
    assert params["p"]["version"] == 6
    assert params["q"]["version"] == 3
