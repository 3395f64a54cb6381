"""Many clients at once against the real server: no lost update, no torn read."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.support.server import Server

pytestmark = pytest.mark.e2e  # starts real server processes

LR = 2.0**-10  # SGD steps of exactly representable size: any order gives the same bits
SIZE = 1 << 18  # large enough that a read racing a write would see two versions


def test_threads_hammering_shared_and_own_params(tmp_path) -> None:
    workers, steps = 8, 25
    with Server(tmp_path) as server:
        with httpx.Client(base_url=server.url) as c:
            for name in ["shared", *[f"own{i}" for i in range(workers)]]:
                body = {
                    "name": name,
                    "shape": [SIZE],
                    "group": {"algorithm": "sgd", "hyperparams": {"lr": LR}},
                }
                assert c.post("/v1/runs/t/params", json=body).status_code == 201

        ones = np.ones(SIZE, np.float32).tobytes()

        def work(i: int) -> list[str]:
            problems = []
            with httpx.Client(base_url=server.url, timeout=60) as c:
                for _ in range(steps):
                    for name in ("shared", f"own{i}"):
                        r = c.post(f"/v1/runs/t/params/{name}/step", content=ones)
                        p = np.frombuffer(r.content, np.float32)
                        if r.status_code != 200 or p.min() != p.max():
                            problems.append(f"{name}: {r.status_code} {p.min()} {p.max()}")
                    r = c.get("/v1/runs/t/params/shared/value")
                    p = np.frombuffer(r.content, np.float32)
                    if p.min() != p.max():
                        problems.append(f"torn read of shared: {p.min()} {p.max()}")
            return problems

        with ThreadPoolExecutor(workers) as pool:
            problems = [p for result in pool.map(work, range(workers)) for p in result]
        assert problems == []

        with httpx.Client(base_url=server.url) as c:
            infos = {i["name"]: i for i in c.get("/v1/runs/t/params").json()}
            assert infos["shared"]["version"] == workers * steps
            shared = np.frombuffer(c.get("/v1/runs/t/params/shared/value").content, np.float32)
            np.testing.assert_array_equal(shared, np.float32(-LR * workers * steps))
            for i in range(workers):
                own = np.frombuffer(c.get(f"/v1/runs/t/params/own{i}/value").content, np.float32)
                np.testing.assert_array_equal(own, np.float32(-LR * steps))
