"""Async workers that recover: a gradient refused as stale brings the current parameters
back (the worker continues from them), ``pull``/``pull_all`` fetch them without stepping,
over http:// and shm:// alike; and four async workers train the digits problem."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
from stepd.client import connect

from tests.support.clients import connect_shared
from tests.support.server import ShmServer
from tests.support.state import assert_same_state

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm"),
]

SHAPES = {"w": (3, 2), "b": (2,)}


@pytest.fixture(scope="module")
def srv() -> Iterator[ShmServer]:
    with ShmServer() as s:
        yield s


def _url(srv: ShmServer, transport: str) -> str:
    return srv.url if transport == "http" else srv.shm_url


def _server_value(srv: ShmServer, run: str, name: str) -> np.ndarray:
    r = httpx.get(f"{srv.url}/v1/runs/{run}/params/{name}/value")
    r.raise_for_status()
    return np.frombuffer(r.content, np.float32).reshape(SHAPES[name])


def _grad(k: int, name: str) -> np.ndarray:
    return (
        np.random.default_rng(100 * k + len(name)).standard_normal(SHAPES[name]).astype(np.float32)
    )


@pytest.mark.parametrize("transport", ["http", "shm"])
def test_a_stale_step_refreshes_the_params_and_changes_nothing_on_the_server(
    srv, transport
) -> None:
    """SGD with momentum (a state slot to compare); the applied gradients, in the order the
    server applied them, replayed by torch.optim.SGD give the server's parameters."""
    run = f"stale-{transport}"
    url = _url(srv, transport)
    mode = {"mode": "async", "max_staleness": 1}
    hp = {"lr": 0.1, "momentum": 0.9}
    init = {
        n: np.linspace(-1, 1, np.prod(s), dtype=np.float32).reshape(s) for n, s in SHAPES.items()
    }
    with (
        connect(url, "sgd", run=run, worker="a", workers=mode, **hp) as a,
        connect(url, "sgd", run=run, worker="b", workers=mode, **hp) as b,
    ):
        pa = {n: v.copy() for n, v in init.items()}
        pb = {n: v.copy() for n, v in init.items()}

        def step(opt, params: dict[str, np.ndarray], k: int) -> None:
            opt.step_batch([(n, SHAPES[n], params[n], _grad(k, n)) for n in SHAPES])

        applied = [1, 2, 3]
        step(a, pa, 1)  # registers, v1
        step(b, pb, 2)  # the server's copy (v1) wins at registration; v2
        step(b, pb, 3)  # v3: a's copy (v1) is now 2 behind
        before = b.state_dict()
        step(a, pa, 4)  # refused: nothing applied, a gets v3's values
        assert a.stale_gradients == len(SHAPES)
        assert b.stale_gradients == 0
        assert_same_state(b.state_dict(), before)  # the full optimizer state is untouched
        for n in SHAPES:
            np.testing.assert_array_equal(pa[n], pb[n])
            np.testing.assert_array_equal(pa[n], _server_value(srv, run, n))
        step(a, pa, 5)  # from v3: applied, v4
        applied.append(5)
        assert a.stale_gradients == len(SHAPES)

    ref = {n: torch.tensor(v) for n, v in init.items()}
    torch_opt = torch.optim.SGD(list(ref.values()), **hp)
    for k in applied:
        for n, t in ref.items():
            t.grad = torch.from_numpy(_grad(k, n))
        torch_opt.step()
    for n, t in ref.items():
        np.testing.assert_allclose(_server_value(srv, run, n), t.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(pa[n], _server_value(srv, run, n))


@pytest.mark.parametrize("transport", ["http", "shm"])
def test_pull_and_pull_all_write_the_servers_values_and_versions(srv, transport) -> None:
    run = f"pull-{transport}"
    url = _url(srv, transport)
    mode = {"mode": "async", "max_staleness": 0}  # only a current version is accepted
    with (
        connect(url, "sgd", run=run, worker="a", workers=mode, lr=1.0) as a,
        connect(url, "sgd", run=run, worker="b", workers=mode, lr=1.0) as b,
    ):
        pa = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
        pb = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()}
        with pytest.raises(ValueError, match="not registered"):
            b.pull("w")  # nothing sent: b has no array for it
        for n in SHAPES:
            b.register(n, SHAPES[n], pb[n])
        a.step_batch([(n, SHAPES[n], pa[n], _grad(1, n)) for n in SHAPES])
        a.step("w", SHAPES["w"], pa["w"], _grad(2, "w"))  # w at v2, b at v1
        b.pull("w")  # w only
        np.testing.assert_array_equal(pb["w"], pa["w"])
        np.testing.assert_array_equal(pb["b"], np.zeros(2, np.float32))
        b.step("w", SHAPES["w"], pb["w"], _grad(3, "w"))  # from the pulled v2: applied
        np.testing.assert_array_equal(pb["w"], pa["w"] - _grad(3, "w"))  # SGD, lr 1
        b.pull_all()
        for n in SHAPES:
            np.testing.assert_array_equal(pb[n], _server_value(srv, run, n))
        b.step_batch([(n, SHAPES[n], pb[n], _grad(4, n)) for n in SHAPES])  # both current
        assert b.stale_gradients == 0
        expect_b = pa["b"] - _grad(4, "b")
        np.testing.assert_array_equal(pb["b"], expect_b)
        np.testing.assert_array_equal(_server_value(srv, run, "b"), expect_b)
        a.pull_all()
        for n in SHAPES:
            np.testing.assert_array_equal(pa[n], pb[n])
    info = {p["name"]: p["version"] for p in httpx.get(f"{srv.url}/v1/runs/{run}/params").json()}
    assert info == {"w": 4, "b": 2}


def test_pull_in_process_keeps_the_arrays_that_are_the_values() -> None:
    opt = connect("local://", "sgd", lr=1.0)
    p = np.ones(2, np.float32)
    opt.step("p", (2,), p, np.ones(2, np.float32))
    opt.pull("p")
    opt.pull_all()
    np.testing.assert_array_equal(p, [0, 0])
    bf = np.full(2, 0x3F80, np.uint16)  # bfloat16 1.0: a float32 master is kept here
    opt.step("h", (2,), bf, np.full(2, 2**-10, np.float32))  # 1 - 2^-10 rounds back to 1.0
    bf[:] = 0
    opt.pull("h")  # the master's value, rounded
    np.testing.assert_array_equal(bf, [0x3F80, 0x3F80])
    assert opt.stale_gradients == 0


# -- four async workers on the digits ------------------------------------------------------


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32), data.target


def _loss_grads(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Softmax regression: mean cross-entropy and its gradients (numpy, float64 inside)."""
    logits = x.astype(np.float64) @ w.T + b
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(probs[np.arange(n), y]).mean())
    d = probs
    d[np.arange(n), y] -= 1
    d /= n
    return loss, (d.T @ x).astype(np.float32), d.sum(0).astype(np.float32)


def test_four_async_workers_recover_from_stale_gradients_and_converge(srv) -> None:
    n_workers, steps, batch = 4, 120, 32
    x, y = _digits()
    mode = {"mode": "async", "max_staleness": 2}
    w0, b0 = np.zeros((10, 64), np.float32), np.zeros(10, np.float32)
    start = _loss_grads(w0, b0, x, y)[0]
    stale = [0] * n_workers
    finals: dict[int, float] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            rng = np.random.default_rng(i)
            mine = np.arange(i, len(y), n_workers)  # each worker its own quarter of the data
            with connect_shared(
                srv.url, "adamw", lr=0.02, worker=f"a{i}", workers=mode, run="digits"
            ) as opt:
                w, b = w0.copy(), b0.copy()
                for _ in range(steps):
                    pick = rng.choice(mine, batch, replace=False)
                    _, gw, gb = _loss_grads(w, b, x[pick], y[pick])
                    opt.step_batch([("w", w.shape, w, gw), ("b", b.shape, b, gb)])
                stale[i] = opt.stale_gradients // 2  # a refused step refuses both names
                finals[i] = _loss_grads(w, b, x, y)[0]
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)

    began = time.monotonic()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    seconds = time.monotonic() - began
    assert not errors, errors[0]
    accepted = [1 - s / steps for s in stale]
    print(
        f"\naccepted fractions {[round(f, 3) for f in accepted]} in {seconds:.1f} s; "
        f"loss {start:.3f} -> {[round(v, 3) for v in finals.values()]}"
    )
    params = {p["name"]: p["version"] for p in httpx.get(f"{srv.url}/v1/runs/digits/params").json()}
    assert params["w"] == params["b"] == n_workers * steps - sum(stale)  # each applied once
    # Most gradients are accepted, and every worker recovers and keeps contributing. Each
    # worker's share depends on how the threads are scheduled (one was at 0.44 on a loaded
    # machine while the mean stayed near 0.7), so "most" is asserted over the workers.
    assert sum(accepted) / n_workers > 0.5, accepted
    assert all(f > 0.25 for f in accepted), accepted
    r = httpx.get(f"{srv.url}/v1/runs/digits/params/w/value")
    w = np.frombuffer(r.content, np.float32).reshape(10, 64)
    bias = np.frombuffer(httpx.get(f"{srv.url}/v1/runs/digits/params/b/value").content, np.float32)
    end = _loss_grads(w, bias, x, y)[0]
    assert end < 0.25 * start, (start, end)
    assert all(f < 0.3 * start for f in finals.values()), finals
