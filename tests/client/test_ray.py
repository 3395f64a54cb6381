"""stepd shards as Ray actors (stepd.ray) on a local Ray cluster, reached by ray://<name>.

Training through the cluster equals training in process, bit for bit in float32; a shard
killed mid-training is restarted by Ray from its newest autosave, and ``recover()`` puts the
run back on the newest step every shard has saved: exactly the iterations after it are lost
(and run again), so the end result still equals uninterrupted local training.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from stepd.client.errors import TransportError

import stepd
from stepd.wire import shard_of
from tests.support.server import wait_until

HP = {"lr": 0.05, "weight_decay": 0.01}
SHAPES = {"l1.weight": (4, 3), "l1.bias": (3,), "l2.weight": (3, 2), "l2.bias": (2,)}


def test_ray_url_is_checked_before_ray_is_needed() -> None:
    pytest.importorskip("ray")
    from stepd.ray import resolve

    for bad in ("ray://", "ray://opt/extra", "ray://opt?transport=udp", "http://x"):
        with pytest.raises(ValueError, match="ray://"):
            resolve(bad)


def _init() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def _grads(params: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
    """MSE gradients of a two-layer linear model on the batch of ``step`` (float64 math,
    float32 out: the same numbers whoever computes them)."""
    rng = np.random.default_rng(100 + step)
    x = rng.standard_normal((8, 4))
    y = rng.standard_normal((8, 2))
    w1, b1 = params["l1.weight"].astype(np.float64), params["l1.bias"].astype(np.float64)
    w2, b2 = params["l2.weight"].astype(np.float64), params["l2.bias"].astype(np.float64)
    h = x @ w1 + b1
    d_out = 2.0 * (h @ w2 + b2 - y) / y.size
    d_h = d_out @ w2.T
    grads = {"l1.weight": x.T @ d_h, "l1.bias": d_h.sum(0), "l2.weight": h.T @ d_out}
    grads["l2.bias"] = d_out.sum(0)
    return {n: np.ascontiguousarray(g, dtype=np.float32) for n, g in grads.items()}


def _iteration(opt: Any, params: dict[str, np.ndarray], step: int) -> int:
    grads = _grads(params, step)
    opt.step_batch([(n, SHAPES[n], params[n], grads[n]) for n in SHAPES])
    return int(opt.end_iteration())


def _local(iterations: int) -> dict[str, np.ndarray]:
    params = _init()
    opt = stepd.connect("local://?backend=cpu", "adamw", **HP)
    for step in range(iterations):
        assert _iteration(opt, params, step) == step + 1
    opt.close()
    return params


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def cluster(ray_local: Any, tmp_path: Path) -> Iterator[Any]:
    from stepd.ray import StepdCluster

    c = StepdCluster.start(
        f"t-{tmp_path.name[-20:]}",
        2,
        tmp_path / "ckpt",
        resources_per_shard={"num_cpus": 0.5},
        autosave_every=2,  # so a kill after step 5 loses step 5: the loss is visible
        device="cpu",
    )
    try:
        yield c
    finally:
        c.shutdown()


def test_both_shards_hold_parameters() -> None:
    assert {shard_of(n, 2) for n in SHAPES} == {0, 1}


@pytest.mark.e2e
@pytest.mark.parametrize("transport", ["auto", "http"])
def test_training_equals_local(cluster: Any, transport: str) -> None:
    params = _init()
    with stepd.connect(f"ray://{cluster.name}?transport={transport}", "adamw", **HP) as opt:
        schemes = {u.split(":")[0] for u in opt.urls}
        assert schemes == ({"shm"} if transport == "auto" else {"http"})  # one node here
        for step in range(6):
            assert _iteration(opt, params, step) == step + 1
    want = _local(6)
    for n in SHAPES:
        np.testing.assert_allclose(params[n], want[n], rtol=0, atol=1e-6)


@pytest.mark.e2e
def test_shard_killed_mid_training_restores_and_recovers(cluster: Any) -> None:
    from stepd.ray import StepdCluster

    ray = pytest.importorskip("ray")
    iterations, kill_after = 8, 5
    params = _init()
    opt = stepd.connect(f"ray://{cluster.name}?transport=http", "adamw", run="job", **HP)
    step, recovered = 0, []
    while step < iterations:
        try:
            step = _iteration(opt, params, step)
        except TransportError:
            step = opt.recover()
            recovered.append(step)
            continue
        if step == kill_after and not recovered:
            before = cluster.addresses()[1]
            ray.kill(cluster.shard_actors()[1], no_restart=False)

            def refused(url: str = before["http"]) -> bool:
                try:
                    httpx.get(f"{url}/healthz", timeout=0.5)
                except httpx.TransportError:
                    return True
                return False

            # the server died with its actor: nothing answers on the old address
            assert wait_until(refused, timeout=20)
            after = StepdCluster.get(cluster.name).addresses()[1]  # waits for the restart
            assert after["restarted"]
            assert after["http"] != before["http"]
            # restored before it served: its newest autosave, step 4 (autosave_every=2)
            assert after["restored"] == {"job": "auto-00000004"}
            r = httpx.get(f"{after['http']}/v1/runs/job", timeout=5)
            assert r.json()["global_step"] == 4
    # The first call to the dead shard failed; recover() went back to step 4 on both shards:
    # step 5 (done before the kill) is what was lost, and was computed again.
    assert recovered == [4]
    assert step == iterations
    want = _local(iterations)
    for n in SHAPES:
        np.testing.assert_allclose(params[n], want[n], rtol=0, atol=1e-6)
    opt.close()
