"""Idempotent steps over http://: a step whose reply is lost is resent with the same
``X-Stepd-Request-Id`` and applied exactly once (client/http.py, service/requests.py)."""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from stepd.client import TransportError, connect

from tests.support.clients import connect_shared
from tests.support.proxy import DroppingProxy

SGD = {"lr": 0.5, "momentum": 0.9}  # momentum: applying a gradient twice shows in the value
RID = "0123456789abcdef0123456789abcdef-1"


def info(url: str, name: str) -> dict:
    return httpx.get(f"{url}/v1/runs/t/params/{name}").json()


def value(url: str, name: str) -> np.ndarray:
    return np.frombuffer(httpx.get(f"{url}/v1/runs/t/params/{name}/value").content, np.float32)


def oracle(grads: list[np.ndarray], p0: np.ndarray) -> np.ndarray:
    """The same steps in process (local://), each applied once."""
    p = p0.copy()
    with connect("local://?backend=cpu", "sgd", **SGD) as local:
        for g in grads:
            local.step("w", p.shape, p, g)
    return p


def test_a_lost_reply_is_retried_and_the_step_applied_once(shared_server) -> None:
    url, name = shared_server.url, "retry.once"
    proxy = DroppingProxy(shared_server.port)
    grads = [np.full(3, k + 1.0, np.float32) for k in range(3)]
    p0 = np.arange(3, dtype=np.float32)
    try:
        with connect_shared(proxy.url, "sgd", timeout=5.0, **SGD) as opt:
            p = p0.copy()
            opt.step(name, (3,), p, grads[0])
            version = info(url, name)["version"]
            opened = proxy.accepted
            proxy.drop_next(1)
            opt.step(name, (3,), p, grads[1])  # the reply is lost once: resent, succeeds
            assert proxy.accepted == opened + 1  # it did go out again, on a new connection
            assert info(url, name)["version"] == version + 1
            want = oracle(grads[:2], p0)
            np.testing.assert_array_equal(p, want)
            np.testing.assert_array_equal(value(url, name), want)
            proxy.drop_next(1)
            opt.step_batch([(name, (3,), p, grads[2])])  # the batch endpoint too
            assert info(url, name)["version"] == version + 2
            np.testing.assert_array_equal(p, oracle(grads, p0))
    finally:
        proxy.close()


def test_when_every_delivery_is_lost_it_is_a_TransportError_applied_once(shared_server) -> None:
    url, name = shared_server.url, "retry.lost"
    proxy = DroppingProxy(shared_server.port)
    try:
        with connect_shared(proxy.url, "sgd", timeout=5.0, retries=2, **SGD) as opt:
            p = np.zeros(3, np.float32)
            opt.step(name, (3,), p, np.ones(3, np.float32))
            before, version, opened = p.copy(), info(url, name)["version"], proxy.accepted
            proxy.drop.set()
            with pytest.raises(TransportError) as err:
                opt.step(name, (3,), p, np.ones(3, np.float32))
            assert isinstance(err.value.__cause__, httpx.TransportError)
            assert proxy.accepted == opened + 2  # two retries, each on a new connection
            np.testing.assert_array_equal(p, before)  # untouched
            assert info(url, name)["version"] == version + 1  # three deliveries, one step
    finally:
        proxy.close()


def test_a_repeated_request_id_gets_the_same_reply_and_changes_nothing(shared_server) -> None:
    url, name = shared_server.url, "retry.by_hand"
    with connect_shared(url, "sgd", **SGD) as opt:
        opt.register(name, (4,), np.ones(4, np.float32))
    g = np.array([1, 2, 3, 4], np.float32).tobytes()
    with httpx.Client(base_url=url) as c:
        first = c.post(
            f"/v1/runs/t/params/{name}/step", content=g, headers={"x-stepd-request-id": RID}
        )
        assert first.status_code == 200, first.text
        state = c.get(f"/v1/runs/t/params/{name}/stats").json()
        again = c.post(
            f"/v1/runs/t/params/{name}/step", content=g, headers={"x-stepd-request-id": RID}
        )
        assert again.status_code == 200
        assert again.content == first.content
        for h in ("x-stepd-version", "x-stepd-applied"):
            assert again.headers[h] == first.headers[h]
        assert c.get(f"/v1/runs/t/params/{name}/stats").json() == state  # no step, no state change
        # the same id for another parameter set is a mistake, not a replay
        other = st_save({name: np.ones(4, np.float32), "retry.other": np.ones(2, np.float32)})
        opt2 = connect_shared(url, "sgd", **SGD)
        opt2.register("retry.other", (2,), np.zeros(2, np.float32))
        opt2.close()
        r = c.post("/v1/runs/t/step", content=other, headers={"x-stepd-request-id": RID})
        assert r.status_code == 409
        assert "already used" in r.json()["detail"]
        assert c.get(f"/v1/runs/t/params/{name}/stats").json() == state
        # a different id applies
        fresh = c.post(
            f"/v1/runs/t/params/{name}/step", content=g, headers={"x-stepd-request-id": RID + "0"}
        )
        assert int(fresh.headers["x-stepd-version"]) == int(first.headers["x-stepd-version"]) + 1
        assert fresh.content != first.content
        # batches replay too
        batch = st_save({name: np.ones(4, np.float32)})
        rid = {"x-stepd-request-id": RID + "b"}
        b1 = c.post("/v1/runs/t/step", content=batch, headers=rid)
        b2 = c.post("/v1/runs/t/step", content=batch, headers=rid)
        assert b1.status_code == b2.status_code == 200
        assert b1.content == b2.content
        assert info(url, name)["version"] == int(first.headers["x-stepd-version"]) + 2
        np.testing.assert_array_equal(st_load(b2.content)[name], value(url, name))


@pytest.mark.parametrize(
    "rid",
    ["short-1", "x" * 129, "0123456789abcdef/0123", "0123456789abcdef 0123", "0123456789abcdéf"],
)
def test_malformed_request_ids_are_422_and_change_nothing(shared_server, rid) -> None:
    url, name = shared_server.url, "retry.bad_id"
    with connect_shared(url, "sgd", **SGD) as opt:
        opt.register(name, (2,), np.ones(2, np.float32))
    before = (info(url, name), value(url, name))
    with httpx.Client(base_url=url) as c:
        for path, body in (
            (f"/v1/runs/t/params/{name}/step", np.ones(2, np.float32).tobytes()),
            ("/v1/runs/t/step", st_save({name: np.ones(2, np.float32)})),
        ):
            r = c.post(path, content=body, headers={"x-stepd-request-id": rid.encode()})
            assert r.status_code == 422, r.text
            assert "invalid X-Stepd-Request-Id" in r.json()["detail"]
    assert info(url, name) == before[0]
    np.testing.assert_array_equal(value(url, name), before[1])


def test_a_repeated_delivery_in_a_sync_round_counts_once(server) -> None:
    name, g = "sync.w", {w: np.full(3, k + 1.0, np.float32) for k, w in enumerate("ab")}
    with httpx.Client(base_url=server.url, timeout=30) as c:
        body = {
            "name": name,
            "shape": [3],
            "group": {"algorithm": "sgd", "hyperparams": {"lr": 1.0}, "workers": {
                "mode": "sync", "count": 2, "timeout_s": 10}},
        }  # fmt: skip
        assert c.post("/v1/runs/t/params", json=body).status_code == 201
    replies: dict[str, httpx.Response] = {}

    def send(key: str, worker: str, rid: str) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as own:
            replies[key] = own.post(
                f"/v1/runs/t/params/{name}/step?worker={worker}",
                content=g[worker].tobytes(),
                headers={"x-stepd-request-id": rid},
            )

    first = threading.Thread(target=send, args=("a", "a", RID))
    first.start()
    retry = threading.Thread(target=send, args=("a again", "a", RID))  # while "a" waits
    retry.start()
    first.join(0.3)
    retry.join(0.3)
    assert not replies  # one delivery of "a" counted so far: the round is still open
    send("b", "b", RID + "-b")
    first.join(10)
    retry.join(10)
    assert {k: r.status_code for k, r in replies.items()} == {"a": 200, "a again": 200, "b": 200}
    want = -(g["a"] + g["b"]) / np.float32(2)  # sgd, lr 1, from zeros: one averaged step
    for r in replies.values():
        np.testing.assert_array_equal(np.frombuffer(r.content, np.float32), want)
        assert r.headers["x-stepd-version"] == "1"
    send("late", "a", RID)  # after the round: the recorded reply, nothing added
    assert replies["late"].status_code == 200
    assert replies["late"].content == replies["a"].content
    send("new id", "a", RID + "-2")  # a genuinely new gradient for a finished round
    assert replies["new id"].status_code == 409
    assert info(server.url, name)["version"] == 1


@pytest.mark.parametrize(("retries", "error"), [(-1, ValueError), (11, ValueError),
                                                 (True, TypeError), ("2", TypeError)])  # fmt: skip
def test_retries_is_validated(retries, error) -> None:
    with pytest.raises(error, match="retries"):
        connect_shared("http://127.0.0.1:9", retries=retries)


def test_a_large_body_sent_in_pieces_is_resent_whole(shared_server) -> None:
    """A body above 1 MiB goes out in pieces; a retry must send all of it again."""
    url, name = shared_server.url, "retry.large"
    proxy = DroppingProxy(shared_server.port)
    n = 600_000  # 2.4 MB
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(2)]
    p0 = rng.standard_normal(n).astype(np.float32)
    try:
        with connect_shared(proxy.url, "sgd", timeout=10.0, **SGD) as opt:
            p = p0.copy()
            opt.step(name, (n,), p, grads[0])
            proxy.drop_next(1)
            opt.step(name, (n,), p, grads[1])
            assert info(url, name)["version"] == 2
            np.testing.assert_array_equal(p, oracle(grads, p0))
    finally:
        proxy.close()
