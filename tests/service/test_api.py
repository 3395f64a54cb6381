"""The HTTP API through FastAPI's TestClient: behaviour, bad input, checkpoints, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from stepd.kernels import create_optimizer

from tests.support.app import assert_same_snapshot as assert_same_state
from tests.support.app import full_state, make_client, register

OCTET = {"content-type": "application/octet-stream"}


def f32(x) -> bytes:
    return np.asarray(x, np.float32).tobytes()


def test_healthz_and_openapi(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    spec = client.get("/openapi.json").json()
    assert "/v1/runs/{run}/params/{name}/step" in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_register_is_idempotent_and_conflicts_are_409(client) -> None:
    value = np.arange(6, dtype=np.float32)
    r = register(client, value=value, lr=1e-2)
    assert r.status_code == 201
    assert r.json()["version"] == 0
    assert register(client, value=value, lr=1e-2).status_code == 200  # same config
    r = register(client, lr=2e-2)
    assert r.status_code == 409
    assert "registered with shape [2, 3]" in r.json()["detail"]
    assert register(client, shape=(3, 2), lr=1e-2).status_code == 409
    np.testing.assert_array_equal(
        np.frombuffer(client.get("/v1/runs/t/params/w/value").content, np.float32), value
    )


def test_steps_match_the_in_process_optimizer_bit_for_bit(client) -> None:
    rng = np.random.default_rng(0)
    value = rng.standard_normal((4, 5)).astype(np.float32)
    register(client, shape=(4, 5), value=value, lr=1e-2, weight_decay=0.1)
    client.put("/v1/runs/t/params/w/lr_scale", json={"lr_scale": 0.5})
    local = create_optimizer("adamw", backend="cpu", lr=1e-2, weight_decay=0.1)
    local.set_lr_scale("w", 0.5)
    p = value.copy()
    for t in range(10):
        g = rng.standard_normal((4, 5)).astype(np.float32)
        r = client.post("/v1/runs/t/params/w/step", content=g.tobytes(), headers=OCTET)
        assert r.status_code == 200
        assert r.headers["x-stepd-version"] == str(t + 1)
        local.step("w", p.shape, p, g)
        np.testing.assert_array_equal(np.frombuffer(r.content, np.float32).reshape(4, 5), p)
        assert client.post("/v1/runs/t/iteration/end").json() == {"global_step": t + 1}
        local.end_iteration()
        if t == 4:
            assert client.put("/v1/runs/t/lr", json={"lr": 5e-3}).status_code == 200
            local.set_lr(5e-3)


def test_step_without_returning_the_param(client) -> None:
    register(client)
    r = client.post("/v1/runs/t/params/w/step?return_param=false", content=f32(np.ones(6)))
    assert r.status_code == 204
    assert r.content == b""
    assert r.headers["x-stepd-version"] == "1"


def test_batch_step_is_one_call_and_equals_single_steps(client) -> None:
    rng = np.random.default_rng(1)
    shapes = {"a": (3,), "b": (2, 2), "c": (5,)}
    for name, shape in shapes.items():
        register(client, name=name, shape=shape, algorithm="lion", lr=1e-3)
    local = create_optimizer("lion", backend="cpu", lr=1e-3)
    params = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    for _ in range(3):
        grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        r = client.post("/v1/runs/t/step", content=st_save(grads))
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-safetensors"
        out = st_load(r.content)  # readable by the reference safetensors implementation
        local.step_batch([(n, shapes[n], params[n], grads[n]) for n in shapes])
        for n in shapes:
            np.testing.assert_array_equal(out[n], params[n])
        client.post("/v1/runs/t/iteration/end")
        local.end_iteration()
    r = client.post(
        "/v1/runs/t/step?return_params=false", content=st_save({"a": np.ones(3, np.float32)})
    )
    assert r.json() == {"versions": {"a": 4}, "skipped": []}


def test_inspection(client) -> None:
    register(client, value=np.arange(6, dtype=np.float32), weight_decay=0.0)
    client.post("/v1/runs/t/params/w/step", content=f32(np.full(6, 2.0)))
    [info] = client.get("/v1/runs/t/params").json()
    assert info["shape"] == [2, 3]
    assert info["algorithm"] == "adamw"
    assert info["version"] == 1
    assert info["state_bytes"] == 2 * 6 * 4
    stats = client.get("/v1/runs/t/params/w/stats").json()
    assert set(stats["slots"]) == {"exp_avg", "exp_avg_sq"}
    assert stats["slots"]["exp_avg"]["mean"] == pytest.approx(0.2)
    assert stats["last_grad_norm"] == pytest.approx(np.sqrt(6 * 4.0))
    assert stats["last_update_norm"] == pytest.approx(np.sqrt(6) * 1e-3, rel=1e-2)
    raw = client.get("/v1/runs/t/params/w/state/exp_avg").content
    np.testing.assert_allclose(np.frombuffer(raw, np.float32), 0.2, rtol=1e-6)
    st = st_load(client.get("/v1/runs/t/params/w/state/exp_avg_sq?format=safetensors").content)
    np.testing.assert_allclose(st["w/exp_avg_sq"], 0.004, rtol=1e-5)
    assert client.get("/v1/runs/t/params/w/state/nope").status_code == 404
    run = client.get("/v1/runs/t").json()
    assert run["params"] == 1
    assert run["device_bytes"] == 3 * 6 * 4
    assert client.get("/v1/status").json()["device_bytes"] == 3 * 6 * 4


def test_metrics(client) -> None:
    register(client)
    client.post("/v1/runs/t/params/w/step", content=f32(np.ones(6)))
    text = client.get("/metrics").text
    assert (
        'stepd_steps_total{group="adamw-' in text
        or 'stepd_steps_total{run="t",group="adamw-' in text
    )
    assert "stepd_step_seconds_bucket" in text
    assert "stepd_bytes_in_total 24.0" in text
    assert "stepd_device_bytes 72.0" in text


def test_checkpoint_restore_continues_bit_identically(client) -> None:
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal(6).astype(np.float32) for _ in range(8)]
    register(client, algorithm="sgd", lr=0.1, momentum=0.9)
    client.put("/v1/runs/t/params/w/lr_scale", json={"lr_scale": 0.3})
    for g in grads[:3]:
        client.post("/v1/runs/t/params/w/step", content=g.tobytes())
        client.post("/v1/runs/t/iteration/end")
    assert client.post("/v1/runs/t/checkpoints", json={"name": "mid"}).status_code == 201
    saved = full_state(client)
    straight = [
        client.post("/v1/runs/t/params/w/step", content=g.tobytes()).content for g in grads[3:]
    ]
    client.put("/v1/runs/t/lr", json={"lr": 1.0})
    client.put("/v1/runs/t/params/w/lr_scale", json={"lr_scale": 1.0})
    r = client.post("/v1/runs/t/checkpoints/mid/restore")
    assert r.status_code == 200
    assert r.json()["global_step"] == 3
    assert_same_state(full_state(client), saved)
    again = [
        client.post("/v1/runs/t/params/w/step", content=g.tobytes()).content for g in grads[3:]
    ]
    assert again == straight
    names = [c["name"] for c in client.get("/v1/runs/t/checkpoints").json()]
    assert names == ["mid"]
    assert client.delete("/v1/runs/t/checkpoints/mid").status_code == 204
    assert client.get("/v1/runs/t/checkpoints").json() == []
    assert client.post("/v1/runs/t/checkpoints/mid/restore").status_code == 404


def test_interrupted_save_leftovers_are_cleaned_at_start_up(tmp_path) -> None:
    ckpt = tmp_path / "ckpt" / "t"  # the run's own folder
    ckpt.mkdir(parents=True)
    (ckpt / ".mid.tmp-1234abcd").write_bytes(b"half a file")
    with make_client(tmp_path) as c:
        assert c.get("/v1/runs/t/checkpoints").json() == []
    assert not list(ckpt.iterdir())


# -- bad input: a clear 4xx and the full state unchanged ---------------------------------


def _primed(client) -> None:
    register(client, value=np.arange(6, dtype=np.float32))
    client.post("/v1/runs/t/params/w/step", content=f32(np.ones(6)))


BAD = [
    (
        "unknown param",
        "post",
        "/v1/runs/t/params/nope/step",
        {"content": f32(np.ones(6))},
        404,
        "parameter 'nope' is not registered",
    ),
    (
        "short body",
        "post",
        "/v1/runs/t/params/w/step",
        {"content": f32(np.ones(5))},
        422,
        "body has 20 bytes, shape [2, 3] of float32 needs 24",
    ),
    (
        "float64 body",
        "post",
        "/v1/runs/t/params/w/step",
        {"content": np.ones(6).tobytes()},
        422,
        "body has 48 bytes",
    ),
    (
        "nan grad",
        "post",
        "/v1/runs/t/params/w/step",
        {"content": f32([1, 2, np.nan, 4, 5, 6])},
        422,
        "non-finite gradient values for 'w'",
    ),
    (
        "inf grad",
        "post",
        "/v1/runs/t/params/w/step",
        {"content": f32([1, 2, np.inf, 4, 5, 6])},
        422,
        "non-finite gradient values",
    ),
    (
        "unknown algorithm",
        "post",
        "/v1/runs/t/params",
        {"json": {"name": "x", "shape": [2], "group": {"algorithm": "adamx"}}},
        422,
        "unknown algorithm 'adamx'",
    ),
    (
        "bad beta",
        "post",
        "/v1/runs/t/params",
        {
            "json": {
                "name": "x",
                "shape": [2],
                "group": {"algorithm": "adam", "hyperparams": {"betas": [1.5, 0.9]}},
            }
        },
        422,
        "Invalid beta parameter at index 0: 1.5",
    ),
    (
        "unknown hyperparameter",
        "post",
        "/v1/runs/t/params",
        {
            "json": {
                "name": "x",
                "shape": [2],
                "group": {"algorithm": "adamw", "hyperparams": {"momentum": 0.9}},
            }
        },
        422,
        "adamw got unknown hyperparameter(s) 'momentum'",
    ),
    (
        "name with slash",
        "post",
        "/v1/runs/t/params",
        {"json": {"name": "a/b", "shape": [2], "group": {"algorithm": "sgd"}}},
        422,
        "invalid parameter name 'a/b'",
    ),
    (
        "negative shape",
        "post",
        "/v1/runs/t/params",
        {"json": {"name": "x", "shape": [-2], "group": {"algorithm": "sgd"}}},
        422,
        "invalid shape [-2]",
    ),
    (
        "value too short",
        "post",
        "/v1/runs/t/params",
        {"json": {"name": "x", "shape": [4], "group": {"algorithm": "sgd"}, "value": "AAAAAA=="}},
        422,
        "value: body has 4 bytes",
    ),
    (
        "value not base64",
        "post",
        "/v1/runs/t/params",
        {"json": {"name": "x", "shape": [1], "group": {"algorithm": "sgd"}, "value": "!!"}},
        422,
        "not valid base64",
    ),
    (
        "invalid json",
        "post",
        "/v1/runs/t/params",
        {"content": b"{nope", "headers": {"content-type": "application/json"}},
        422,
        None,
    ),
    (
        "malformed safetensors",
        "post",
        "/v1/runs/t/step",
        {"content": b"\x10\x00\x00\x00\x00\x00\x00\x00{}"},
        422,
        "header length 16 exceeds the body",
    ),
    (
        "lying safetensors",
        "post",
        "/v1/runs/t/step",
        {"content": st_save({"w": np.ones(6, np.float32)})[:-4]},
        422,
        "invalid data_offsets",
    ),
    (
        "safetensors float64",
        "post",
        "/v1/runs/t/step",
        {"content": st_save({"w": np.ones(6)})},
        422,
        "dtype 'F64'; only F32",
    ),
    (
        "batch with an unknown name",
        "post",
        "/v1/runs/t/step",
        {"content": st_save({"w": np.ones(6, np.float32), "nope": np.ones(1, np.float32)})},
        404,
        "'nope' is not registered",
    ),
    (
        "negative lr",
        "put",
        "/v1/runs/t/lr",
        {"json": {"lr": -1.0}},
        422,
        "Invalid learning rate: -1.0",
    ),
    (
        "unknown group",
        "put",
        "/v1/runs/t/lr",
        {"json": {"lr": 1.0, "group": "x"}},
        404,
        "group 'x' does not exist",
    ),
    (
        "negative lr_scale",
        "put",
        "/v1/runs/t/params/w/lr_scale",
        {"json": {"lr_scale": -2.0}},
        422,
        "Invalid lr_scale for 'w': -2.0",
    ),
    (
        "hessian to adamw",
        "post",
        "/v1/runs/t/params/w/hessian",
        {"content": f32(np.ones(6))},
        422,
        "adamw does not take a Hessian estimate",
    ),
    (
        "bad checkpoint name",
        "post",
        "/v1/runs/t/checkpoints",
        {"json": {"name": "../x"}},
        422,
        "invalid checkpoint name '../x'",
    ),
    (
        "missing checkpoint",
        "post",
        "/v1/runs/t/checkpoints/none/restore",
        {},
        404,
        "checkpoint 'none' does not exist",
    ),
]


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "detail"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_request_is_4xx_and_changes_nothing(client, method, url, kwargs, status, detail):
    _primed(client)
    before = full_state(client)
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == status, r.text
    if detail is not None:
        assert detail in r.json()["detail"]
    assert_same_state(full_state(client), before)


def test_body_over_the_limit_is_413(tmp_path) -> None:
    with make_client(tmp_path, max_body_bytes=256) as c:
        assert register(c, shape=(8,)).status_code == 201  # its gradient fits the limit
        before = full_state(c)
        r = c.post("/v1/runs/t/params/w/step", content=f32(np.ones(100)))
        assert r.status_code == 413
        assert "exceeds the limit of 256" in r.json()["detail"]
        assert_same_state(full_state(c), before)


def test_nonfinite_skip_mode_counts_and_never_applies(tmp_path) -> None:
    with make_client(tmp_path, nonfinite="skip") as c:
        register(c, shape=(3,), value=np.ones(3, np.float32))
        before = full_state(c)
        r = c.post("/v1/runs/t/params/w/step", content=f32([1, np.nan, 1]))
        assert r.status_code == 200
        assert r.headers["x-stepd-applied"] == "false"
        np.testing.assert_array_equal(np.frombuffer(r.content, np.float32), np.ones(3))
        assert_same_state(full_state(c), before)
        assert 'stepd_nonfinite_skipped_total{run="t"} 1.0' in c.get("/metrics").text
        r = c.post(
            "/v1/runs/t/step?return_params=false",
            content=st_save({"w": np.array([np.inf, 0, 0], np.float32)}),
        )
        assert json.loads(r.text) == {"versions": {"w": 0}, "skipped": ["w"]}
        assert_same_state(full_state(c), before)


def test_token_protects_everything_but_healthz(tmp_path) -> None:
    with make_client(tmp_path, token="s3cret") as c:
        assert c.get("/healthz").status_code == 200
        for method, url in [
            ("get", "/v1/runs/t/params"),
            ("get", "/metrics"),
            ("post", "/v1/runs/t/iteration/end"),
            ("get", "/v1/runs/t/checkpoints"),
            ("post", "/v1/runs/t/params/w/step"),
        ]:
            r = getattr(c, method)(url)
            assert r.status_code == 401, url
            assert r.headers["www-authenticate"] == "Bearer"
        ok = {"authorization": "Bearer s3cret"}
        assert c.get("/v1/runs/t/params", headers=ok).status_code == 200
        assert (
            c.get("/v1/runs/t/params", headers={"authorization": "Bearer wrong"}).status_code == 401
        )


def test_autosave_every_k_iterations_keeps_the_last_n(tmp_path) -> None:
    with make_client(tmp_path, autosave_every=2, autosave_keep=2) as c:
        register(c)
        c.post("/v1/runs/t/checkpoints", json={"name": "manual"})
        for _ in range(7):
            c.post("/v1/runs/t/params/w/step", content=f32(np.ones(6)))
            c.post("/v1/runs/t/iteration/end")
        names = sorted(i["name"] for i in c.get("/v1/runs/t/checkpoints").json())
        assert names == ["auto-00000004", "auto-00000006", "manual"]
        steps = {i["name"]: i["global_step"] for i in c.get("/v1/runs/t/checkpoints").json()}
        assert steps["auto-00000006"] == 6


def test_checkpoint_files_are_standard_safetensors(client, tmp_path) -> None:
    register(client, value=np.arange(6, dtype=np.float32))
    client.post("/v1/runs/t/params/w/step", content=f32(np.ones(6)))
    client.post("/v1/runs/t/checkpoints", json={"name": "std"})
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "t" / "std.safetensors"), "np") as f:
        assert set(f.keys()) == {"param/w", "state/w/exp_avg", "state/w/exp_avg_sq"}
        meta = json.loads(f.metadata()["stepd"])
        np.testing.assert_array_equal(
            f.get_tensor("param/w"),
            np.frombuffer(client.get("/v1/runs/t/params/w/value").content, np.float32).reshape(
                2, 3
            ),
        )
    assert meta["params"]["w"]["version"] == 1


def test_a_registration_past_the_memory_budget_is_507_and_makes_nothing(tmp_path) -> None:
    # history=0: the bytes below are the tensors' alone (test_history.py counts histories)
    with make_client(tmp_path, memory_budget=1 << 20, history=0) as c:
        before = full_state(c)
        r = register(c, name="big", shape=(100_000,))  # adamw: 1.2 MB with its two slots
        assert r.status_code == 507, r.text
        assert "commits 1,200,000 bytes" in r.json()["detail"]
        assert_same_state(full_state(c), before)
        status = c.get("/v1/status").json()["memory"]
        assert status == {"budget_bytes": 1 << 20, "committed_bytes": 0}
        assert register(c, name="small", shape=(1000,)).status_code == 201
        assert c.get("/v1/runs/t").json()["committed_bytes"] == 12_000
        r = c.post("/v1/runs", json={"name": "q", "quota_bytes": 5000})
        assert r.json()["quota_bytes"] == 5000
