"""8-bit state through the server: its slots stay uint8 codes + float32 absmax in raw
downloads, group state and checkpoints; inspection shows the values the codes stand for."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from stepd.kernels import create_optimizer

from tests.support.app import assert_same_snapshot, full_state, make_client, register

SHAPE = (20, 30)  # 600 elements: two full blocks of 256 and a partial one
HP = {"lr": 1e-2, "weight_decay": 0.1}


def _steps(client, grads) -> list[bytes]:
    out = []
    for g in grads:
        r = client.post("/v1/runs/t/params/w/step", content=g.tobytes())
        assert r.status_code == 200, r.text
        out.append(r.content)
        client.post("/v1/runs/t/iteration/end")
    return out


@pytest.fixture
def grads() -> list[np.ndarray]:
    rng = np.random.default_rng(8)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(8)]


def test_slots_download_as_codes_and_stats_show_values(client, grads) -> None:
    value = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    r = register(client, shape=SHAPE, algorithm="adamw8bit", value=value, **HP)
    assert r.status_code == 201
    local = create_optimizer("adamw8bit", backend="cpu", **HP)
    p = value.copy()
    for g, got in zip(grads[:4], _steps(client, grads[:4]), strict=True):
        local.step("w", SHAPE, p, g)
        local.end_iteration()
        assert got == p.tobytes()
    want = local.state("w").slots
    for slot, arr in want.items():
        raw = client.get(f"/v1/runs/t/params/w/state/{slot}")
        assert raw.content == arr.tobytes(), slot  # the stored bytes, not widened
        st = st_load(client.get(f"/v1/runs/t/params/w/state/{slot}?format=safetensors").content)
        (got,) = st.values()
        assert (got.dtype, got.shape) == (arr.dtype, arr.shape), slot
        np.testing.assert_array_equal(got, arr)
    assert want["exp_avg"].dtype == np.uint8
    assert want["exp_avg_absmax"].shape == (3,)

    stats = client.get("/v1/runs/t/params/w/stats").json()["slots"]
    assert set(stats) == set(want)  # every slot listed (a client downloads them all)
    values = local.algorithm.dequantized(np, want)
    for state in ("exp_avg", "exp_avg_sq"):
        v = values[state].astype(np.float64)
        assert stats[state]["max"] == pytest.approx(v.max(), rel=1e-6)
        assert stats[state]["min"] == pytest.approx(v.min(), rel=1e-6)
        assert stats[state]["l2_norm"] == pytest.approx(np.linalg.norm(v), rel=1e-5)
    assert stats["exp_avg"]["min"] < 0 < stats["exp_avg"]["max"] < 1  # values, not codes
    assert stats["exp_avg_sq"]["min"] >= 0


@pytest.mark.parametrize("algorithm", ["adamw8bit", "lion8bit", "sgd8bit"])
def test_checkpoint_restore_continues_bit_identically(client, grads, algorithm) -> None:
    register(client, shape=SHAPE, algorithm=algorithm, lr=1e-2)
    _steps(client, grads[:3])
    assert client.post("/v1/runs/t/checkpoints", json={"name": "mid"}).status_code == 201
    saved = full_state(client)
    assert {a.dtype for k, a in saved[0].items() if k.startswith("state/")} >= {np.dtype("u1")}
    straight = _steps(client, grads[3:])
    r = client.post("/v1/runs/t/checkpoints/mid/restore")
    assert r.status_code == 200, r.text
    assert_same_snapshot(full_state(client), saved)
    assert _steps(client, grads[3:]) == straight


def test_budget_counts_a_byte_per_code(tmp_path) -> None:
    # history=0: the bytes are the tensors' alone (test_history.py counts histories)
    with make_client(tmp_path, history=0) as client:
        register(client, shape=SHAPE, algorithm="adamw8bit", lr=1e-2)
        # the float32 param, two uint8 codes per element and two float32 absmax per block
        want = 600 * 4 + 2 * 600 + 2 * 3 * 4
        assert client.get("/v1/runs/t").json()["committed_bytes"] == want
        _steps(client, [np.ones(SHAPE, np.float32)])
        assert client.get("/v1/status").json()["device_bytes"] == want
