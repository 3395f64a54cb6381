"""The client in distributed-worker modes against a real server."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from stepd.client import connect

from tests.support.clients import connect_shared
from tests.support.server import Server

pytestmark = pytest.mark.e2e  # starts real server processes


def test_sync_workers_through_the_client_see_one_averaged_step(tmp_path) -> None:
    results: dict[int, np.ndarray] = {}
    with Server(tmp_path) as server:

        def work(i: int) -> None:
            with connect_shared(
                server.url, "sgd", lr=0.5, worker=f"w{i}", workers={"mode": "sync", "count": 2}
            ) as opt:
                p = np.zeros(3, np.float32)
                for _ in range(4):
                    opt.step("p", p.shape, p, np.full(3, i + 1, np.float32))  # grads 1 and 2
                    opt.end_iteration()
                results[i] = p

        threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], np.full(3, -0.5 * 1.5 * 4, np.float32))


def test_async_client_tracks_versions_itself(tmp_path) -> None:
    with Server(tmp_path) as server:
        mode = {"mode": "async", "max_staleness": 0}
        with (
            connect_shared(server.url, "sgd", lr=1.0, worker="a", workers=mode) as a,
            connect_shared(server.url, "sgd", lr=1.0, worker="b", workers=mode) as b,
        ):
            pa, pb = np.zeros(2, np.float32), np.zeros(2, np.float32)
            g = np.ones(2, np.float32)
            a.step("p", (2,), pa, g)  # registers p, steps it: version 1
            b.step("p", (2,), pb, g)  # the server's copy (v1) wins at registration; v2
            np.testing.assert_array_equal(pb, [-2, -2])
            a.step("p", (2,), pa, g)  # a's copy is from v1, the param is at v2: refused
            np.testing.assert_array_equal(pa, [-2, -2])  # not applied; a has the current value
            assert (a.stale_gradients, b.stale_gradients) == (1, 0)
            b.step("p", (2,), pb, g)  # b is current: v3
            np.testing.assert_array_equal(pb, [-3, -3])


def test_worker_modes_need_http() -> None:
    with pytest.raises(ValueError, match="need a server over http"):
        connect("local://", "sgd", worker="w0")
