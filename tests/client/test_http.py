"""http:// against a real server: registration (server copy wins), error mapping, no hangs."""

from __future__ import annotations

import socket
import time

import httpx
import numpy as np
import pytest
from stepd.client import (
    AuthError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    ServerError,
    StepdError,
    TransportError,
    connect,
)

from tests.support.clients import connect_shared
from tests.support.proxy import DroppingProxy
from tests.support.server import Server, free_port
from tests.support.state import assert_same_state


def f32(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def server_value(url: str, name: str) -> np.ndarray:
    return np.frombuffer(httpx.get(f"{url}/v1/runs/t/params/{name}/value").content, np.float32)


def test_first_step_registers_with_the_local_value(shared_server) -> None:
    url = shared_server.url
    p0 = f32(2, 3)
    with connect_shared(url, "sgd", lr=0.5) as opt:
        opt.register("reg.w", (2, 3), p0.copy())
        np.testing.assert_array_equal(server_value(url, "reg.w"), p0.reshape(-1))
        p = p0.copy()
        opt.step("reg.w", (2, 3), p, np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(p, p0 - 0.5)
    np.testing.assert_array_equal(server_value(url, "reg.w"), p.reshape(-1))


def test_the_servers_copy_wins_when_the_name_exists(shared_server) -> None:
    url = shared_server.url
    g = f32(2, 3, seed=1)
    pa0 = f32(2, 3, seed=2)
    with connect_shared(url, "adamw", lr=1e-2) as a:
        step0 = a.state_dict()["global_step"]
        pa = pa0.copy()
        for _ in range(3):
            a.step("win.w", (2, 3), pa, g)
            a.end_iteration()
    # Another worker (or a restart) brings its own initial value, same config.
    with connect_shared(url, "adamw", lr=1e-2) as b:
        pb = np.zeros((2, 3), np.float32)
        b.register("win.w", (2, 3), pb)
        np.testing.assert_array_equal(pb, pa)  # overwritten in place by the server's copy
    # First contact through a step: it continues from the server's value and state.
    with connect_shared(url, "adamw", lr=1e-2) as c:
        pc = np.full((2, 3), 7.0, np.float32)
        c.step("win.w", (2, 3), pc, g)
    with connect("local://?backend=cpu", "adamw", lr=1e-2) as local:
        local.load_state_dict({**local.state_dict(), "global_step": step0})
        want = pa0.copy()
        for _ in range(3):
            local.step("win.w", (2, 3), want, g)
            local.end_iteration()
        local.step("win.w", (2, 3), want, g)
    np.testing.assert_array_equal(pc, want)
    np.testing.assert_array_equal(server_value(url, "win.w"), pc.reshape(-1))


def test_a_different_config_is_a_conflict_with_the_servers_detail(shared_server) -> None:
    with connect_shared(shared_server.url, "adamw", lr=1e-2) as a:
        a.step("conf.w", (2, 3), f32(2, 3), f32(2, 3))
    p = f32(2, 3, seed=5)
    before = p.copy()
    with (
        connect_shared(shared_server.url, "adamw", lr=2e-2) as b,
        pytest.raises(ConflictError) as err,
    ):
        b.step("conf.w", (2, 3), p, f32(2, 3))
    assert err.value.status == 409
    assert "is registered with shape [2, 3]" in err.value.detail
    np.testing.assert_array_equal(p, before)


def test_unknown_algorithm_is_invalid_at_connect_with_the_servers_detail(shared_server) -> None:
    before = httpx.get(f"{shared_server.url}/v1/runs").json()
    with pytest.raises(InvalidRequestError) as err:
        connect(shared_server.url, "nope")  # anonymous: no run may be left behind
    assert err.value.status == 422
    assert "unknown algorithm 'nope'" in err.value.detail
    assert isinstance(err.value, ServerError)
    with pytest.raises(InvalidRequestError, match="Invalid beta parameter"):
        connect_shared(shared_server.url, "adamw", betas=(1.5, 0.9))
    after = httpx.get(f"{shared_server.url}/v1/runs").json()
    assert [r["name"] for r in after] == [r["name"] for r in before]


def test_not_found_maps_to_NotFoundError(shared_server) -> None:
    with connect_shared(shared_server.url) as opt, pytest.raises(NotFoundError) as err:
        opt.transport.request("GET", "/v1/runs/t/params/missing")
    assert "'missing' is not registered" in err.value.detail


@pytest.mark.e2e
def test_token(tmp_path) -> None:
    with Server(tmp_path / "ckpt", STEPD_TOKEN="s3cret") as srv:
        for token in (None, "wrong"):
            with pytest.raises(AuthError) as err:
                connect_shared(srv.url, token=token)
            assert err.value.status == 401
        with connect_shared(srv.url, "sgd", token="s3cret", lr=1.0) as opt:
            p = np.zeros(2, np.float32)
            opt.step("w", (2,), p, np.ones(2, np.float32))
            np.testing.assert_array_equal(p, [-1.0, -1.0])


def test_dead_server_is_a_TransportError_quickly() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(TransportError) as err:
        connect_shared(url, timeout=2.0)
    assert isinstance(err.value.__cause__, httpx.TransportError)
    assert isinstance(err.value, StepdError)
    assert time.monotonic() - start < 5


def test_a_silent_server_times_out_instead_of_hanging() -> None:
    # A listening socket nobody accept()s: the kernel completes the TCP handshake (backlog),
    # the request is sent, and no answer ever comes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        start = time.monotonic()
        with pytest.raises(TransportError) as err:
            connect_shared(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.3)
        elapsed = time.monotonic() - start
    assert isinstance(err.value.__cause__, httpx.TimeoutException)
    assert elapsed < 3  # two tries of 0.3 s (a status read is retried once)


@pytest.mark.e2e
def test_server_gone_mid_run_leaves_the_param_untouched(tmp_path) -> None:
    srv = Server(tmp_path / "ckpt")
    try:
        opt = connect_shared(srv.url, "adamw", lr=1e-2, timeout=5.0)
        p = f32(3, seed=3)
        opt.step("w", (3,), p, np.ones(3, np.float32))
        srv.stop()
        before = p.copy()
        with pytest.raises(TransportError):
            opt.step("w", (3,), p, np.ones(3, np.float32))
        np.testing.assert_array_equal(p, before)
        with pytest.raises(TransportError):
            opt.step_batch([("w", (3,), p, np.ones(3, np.float32)), ("v", (1,), f32(1), f32(1))])
        np.testing.assert_array_equal(p, before)
        opt.close()
    finally:
        srv.stop()


def test_load_state_dict_over_http_round_trips(shared_server) -> None:
    """The full story is tests/client/test_state_load.py; a group of its own here."""
    with connect_shared(shared_server.url, "sgd", lr=0.1, momentum=0.25) as opt:
        opt.step("lsd.w", (2,), np.zeros(2, np.float32), np.ones(2, np.float32))
        sd = opt.state_dict()
        sd["state"]["lsd.w"]["slots"]["momentum_buffer"] += 1.0
        sd["state"]["lsd.w"]["count"] = 5
        opt.load_state_dict(sd)
        assert_same_state(opt.state_dict(), sd)


def test_closed_optimizer_refuses_calls(shared_server) -> None:
    opt = connect_shared(shared_server.url)
    opt.close()
    opt.close()  # idempotent
    with pytest.raises(StepdError, match="closed"):
        opt.end_iteration()


def test_without_retries_a_lost_reply_is_a_TransportError_applied_once(shared_server) -> None:
    proxy = DroppingProxy(shared_server.port)
    try:
        with connect_shared(proxy.url, "sgd", lr=1.0, timeout=5.0, retries=0) as opt:
            p = np.zeros(3, np.float32)
            opt.step("lost.w", (3,), p, np.ones(3, np.float32))
            version = httpx.get(f"{shared_server.url}/v1/runs/t/params/lost.w").json()["version"]
            proxy.drop.set()
            with pytest.raises(TransportError) as err:
                opt.step("lost.w", (3,), p, np.ones(3, np.float32))
            assert isinstance(err.value.__cause__, httpx.TransportError)
            np.testing.assert_array_equal(p, [-1, -1, -1])  # untouched
            # the server applied it exactly once: no retry doubled the gradient
            info = httpx.get(f"{shared_server.url}/v1/runs/t/params/lost.w").json()
            assert info["version"] == version + 1
            proxy.drop.clear()
            opt.step("lost.w", (3,), p, np.ones(3, np.float32))  # a fresh connection works
            np.testing.assert_array_equal(p, [-3, -3, -3])  # the server's value wins
    finally:
        proxy.close()


def test_large_bodies_in_pieces_match_local_bit_for_bit(server) -> None:
    """Bodies above 1 MiB go out in pieces straight from the arrays (one tensor and a
    batch): the server must see exactly the same bytes. A server of its own: AdamW depends
    on the global step, which other tests advance on the shared one."""
    rng = np.random.default_rng(7)
    shapes = {"big.one": (700, 1000), "big.b0": (300, 1000), "big.b1": (1, 5)}
    grads = [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)
    ]
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    results = []
    for url in ("local://", server.url):
        params = {k: v.copy() for k, v in init.items()}
        with connect_shared(url, "adamw", lr=1e-2) as opt:
            for g in grads:
                opt.step("big.one", shapes["big.one"], params["big.one"], g["big.one"])
                opt.step_batch([(k, shapes[k], params[k], g[k]) for k in ("big.b0", "big.b1")])
        results.append(params)
    for k in shapes:
        np.testing.assert_array_equal(results[0][k], results[1][k])
