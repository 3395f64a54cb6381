"""Parameters sharded over three real servers, the same run as on one server."""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
from stepd.client import ConflictError

from stepd.wire import shard_of
from tests.support.clients import connect_shared
from tests.support.server import Server

pytestmark = pytest.mark.e2e  # starts real server processes

NAMES = [f"layers.{i}.{kind}" for i in range(10) for kind in ("weight", "bias")]


def test_the_hash_is_stable_across_runs() -> None:
    # One function for client and server (stepd.wire); a fresh interpreter (another hash
    # seed) gives the same answers: not Python's hash().
    code = "from stepd.wire import shard_of; print([shard_of(f'p{i}', 5) for i in range(9)])"
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": str(seed), "PATH": ""},
            check=True,
        ).stdout
        for seed in (1, 2)
    }
    assert len(runs) == 1
    assert runs.pop().strip() == str([shard_of(f"p{i}", 5) for i in range(9)])
    assert len({shard_of(n, 3) for n in NAMES}) == 3  # the test names use every shard


def _train(opt, steps: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    params = {n: np.full((3, 4) if n.endswith("weight") else (4,), 0.5, np.float32) for n in NAMES}
    for _ in range(steps):
        grads = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in params.items()}
        opt.step_batch([(n, p.shape, p, grads[n]) for n, p in params.items()])
        opt.step(NAMES[0], params[NAMES[0]].shape, params[NAMES[0]], grads[NAMES[0]])
        opt.end_iteration()
    return params


def test_three_servers_train_like_one(tmp_path) -> None:
    hp = {"lr": 1e-2, "weight_decay": 0.01}
    with Server(tmp_path / "one") as single, connect_shared(single.url, "adamw", **hp) as opt:
        expected = _train(opt)
    servers = [
        Server(tmp_path / f"s{i}", STEPD_SHARD_INDEX=str(i), STEPD_SHARD_COUNT="3")
        for i in range(3)
    ]
    try:
        urls = [s.url for s in servers]
        with connect_shared(urls, "adamw", **hp) as opt:
            got = _train(opt)
            assert opt.state_dict()["state"].keys() == set(NAMES)
        for n in NAMES:
            np.testing.assert_array_equal(got[n], expected[n], err_msg=n)
        for i, s in enumerate(servers):  # each holds exactly its own parameters
            held = {p["name"] for p in httpx.get(f"{s.url}/v1/runs/t/params").json()}
            assert held == {n for n in NAMES if shard_of(n, 3) == i}

        # A client with the wrong server list is refused, loudly.
        with pytest.raises(ValueError, match="shard"):
            connect_shared(urls[:2], "adamw", **hp)
        wrong = {
            "name": "x",
            "shape": [1],
            "group": {"algorithm": "adamw"},
            "shard": {"index": 0, "count": 2},
        }
        r = httpx.post(f"{urls[0]}/v1/runs/t/params", json=wrong)
        assert r.status_code == 409
        assert "expects shard 0 of 2" in r.json()["detail"]
        foreign = next(n for n in NAMES if shard_of(n, 3) == 1)
        r = httpx.post(
            f"{urls[0]}/v1/runs/t/params",
            json={"name": foreign, "shape": [1], "group": {"algorithm": "adamw"}},
        )
        assert r.status_code == 409
        assert "belongs to shard 1 of 3" in r.json()["detail"]
        with connect_shared(urls[0], "adamw") as lone, pytest.raises(ConflictError):
            lone.step(foreign, (1,), np.zeros(1, np.float32), np.ones(1, np.float32))
    finally:
        for s in servers:
            s.stop()
