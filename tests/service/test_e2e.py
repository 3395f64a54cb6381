"""End to end: the real `stepd serve` process, spoken to over HTTP on loopback."""

from __future__ import annotations

import signal

import httpx
import numpy as np
import pytest
from stepd.kernels import create_optimizer

from tests.support.app import b64
from tests.support.server import Server

pytestmark = pytest.mark.e2e  # starts real server processes


def _register(c: httpx.Client, value: np.ndarray) -> None:
    body = {
        "name": "layer.weight",
        "shape": list(value.shape),
        "group": {"algorithm": "nadamw", "hyperparams": {"lr": 1e-2, "weight_decay": 0.05}},
        "value": b64(value),
    }
    assert c.post("/v1/runs/t/params", json=body).status_code == 201


def _step(c: httpx.Client, g: np.ndarray) -> np.ndarray:
    r = c.post("/v1/runs/t/params/layer.weight/step", content=g.tobytes())
    assert r.status_code == 200, r.text
    return np.frombuffer(r.content, np.float32).reshape(g.shape)


def test_restart_from_checkpoint_across_two_processes(tmp_path) -> None:
    rng = np.random.default_rng(0)
    value = rng.standard_normal((64, 33)).astype(np.float32)
    grads = [rng.standard_normal(value.shape).astype(np.float32) for _ in range(12)]
    local = create_optimizer("nadamw", backend="cpu", lr=1e-2, weight_decay=0.05)
    expected = value.copy()
    for g in grads:
        local.step("layer.weight", expected.shape, expected, g)
        local.end_iteration()

    with Server(tmp_path) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        _register(c, value)
        for g in grads[:5]:
            _step(c, g)
            c.post("/v1/runs/t/iteration/end")
        assert c.post("/v1/runs/t/checkpoints", json={"name": "five"}).status_code == 201
        _step(c, grads[5])  # lost with the process: the restore goes back to step 5
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL

    with Server(tmp_path) as server, httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.get("/v1/runs/t/params").json() == []  # a fresh process starts empty
        assert c.post("/v1/runs/t/checkpoints/five/restore").json()["global_step"] == 5
        for g in grads[5:]:
            p = _step(c, g)
            c.post("/v1/runs/t/iteration/end")
    np.testing.assert_array_equal(p, expected)


def test_sigterm_writes_the_final_checkpoint(tmp_path) -> None:
    with Server(tmp_path, STEPD_CHECKPOINT_ON_SHUTDOWN="true") as server:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            _register(c, np.ones((2, 2), np.float32))
            _step(c, np.ones((2, 2), np.float32))
        # uvicorn drains, runs the lifespan's shutdown, then re-raises the signal.
        assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    files = [p.name for p in (tmp_path / "t").iterdir()]  # the run's folder
    assert len(files) == 1
    assert files[0].endswith(".safetensors")


def test_a_small_but_costly_step_does_not_hold_up_the_server(tmp_path) -> None:
    """A SOAP step of 65536 elements (its first: eigenbases of a 2048x2048 factor) takes
    about a second; it ran on the event loop, and /healthz waited for all of it."""
    import threading
    import time

    shape = (2048, 32)
    with Server(tmp_path) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        body = {"name": "s", "shape": list(shape), "group": {"algorithm": "soap"}}
        assert c.post("/v1/runs/t/params", json=body).status_code == 201
        grad = np.random.default_rng(0).standard_normal(shape).astype(np.float32).tobytes()
        done: list[float] = []

        def step() -> None:
            t = time.perf_counter()
            with httpx.Client(base_url=server.url, timeout=60) as s:
                assert s.post("/v1/runs/t/params/s/step", content=grad).status_code == 200
            done.append(time.perf_counter() - t)

        worker = threading.Thread(target=step)
        worker.start()
        time.sleep(0.05)  # the step is in
        waits = []
        while worker.is_alive():
            t = time.perf_counter()
            assert c.get("/healthz").status_code == 200
            waits.append(time.perf_counter() - t)
            time.sleep(0.01)
        worker.join()
    assert done, "the step did not finish"
    assert waits, "the step finished before /healthz was asked"
    assert max(waits) < min(0.5, done[0] / 2), (max(waits), done[0])
