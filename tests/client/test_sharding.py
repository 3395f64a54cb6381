"""Parameters sharded over three real servers, the same run as on one server."""

from __future__ import annotations

import subprocess
import sys
import threading

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


@pytest.mark.parametrize(
    "mode",
    [
        {"mode": "sync", "count": 2, "timeout_s": 20},
        {"mode": "sync", "lease_s": 10.0, "timeout_s": 20},  # no count: members by join()
    ],
    ids=["count", "joined"],
)
def test_a_shard_without_parameters_of_the_iteration_keeps_step(tmp_path, mode) -> None:
    # Shard 1 owns none of the parameters until iteration 3 (an expert first used then): it
    # has no sync group before, yet its end_iteration must be the run's barrier, not advance
    # once per worker and run ahead of shard 0 ("the shards disagree on the global step").
    early = [n for n in NAMES if shard_of(n, 2) == 0][:2]
    late = next(n for n in NAMES if shard_of(n, 2) == 1)
    servers = [
        Server(tmp_path / f"s{i}", STEPD_SHARD_INDEX=str(i), STEPD_SHARD_COUNT="2")
        for i in range(2)
    ]
    opts = {}
    try:
        urls = [s.url for s in servers]
        for w in ("a", "b"):
            opts[w] = connect_shared(urls, "sgd", lr=1.0, worker=w, workers=mode)
            if "count" not in mode:
                assert [m["member_from"] for m in opts[w].join()] == [1, 1]
        params = {w: {n: np.zeros(2, np.float32) for n in [*early, late]} for w in opts}
        steps: dict[str, list[int]] = {w: [] for w in opts}

        def work(w: str) -> None:
            for it in range(4):
                names = early + ([late] if it >= 2 else [])
                g = np.full(2, 1.0 if w == "a" else 3.0, np.float32)
                opts[w].step_batch([(n, (2,), params[w][n], g) for n in names])
                steps[w].append(opts[w].end_iteration())

        threads = [threading.Thread(target=work, args=(w,)) for w in opts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert steps == {"a": [1, 2, 3, 4], "b": [1, 2, 3, 4]}
        for w in opts:  # the mean gradient 2, four times for early, twice for late
            for n in early:
                np.testing.assert_array_equal(params[w][n], [-8, -8])
            np.testing.assert_array_equal(params[w][late], [-4, -4])
        for s in servers:
            assert httpx.get(f"{s.url}/v1/runs/t").json()["global_step"] == 4
        # a worker announcing another count is refused when it connects, not mid-run
        if "count" in mode:
            with pytest.raises(ConflictError, match="share one worker count"):
                connect_shared(urls, "sgd", lr=1.0, worker="c", workers={**mode, "count": 3})
    finally:
        for opt in opts.values():
            opt.close()
        for s in servers:
            s.stop()
