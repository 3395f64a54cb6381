"""Runs on a real server: isolated namespaces, steps and checkpoints; named runs shared,
anonymous runs private, deleted on close and reaped when their client vanished."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import httpx
import numpy as np
import pytest
from stepd.client import connect

from tests.support.server import ShmServer, wait_until

pytestmark = pytest.mark.e2e  # starts real server processes

SHAPES = {"fc.weight": (4, 3), "fc.bias": (3,)}


def params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def train(opt, p: dict[str, np.ndarray], seed: int, iterations: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(iterations):
        grads = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in p.items()}
        opt.step_batch([(n, a.shape, a, grads[n]) for n, a in p.items()])
        opt.end_iteration()


def runs(url: str) -> dict[str, dict]:
    return {r["name"]: r for r in httpx.get(f"{url}/v1/runs").json()}


@pytest.mark.parametrize("kind", ["http", "shm"])
def test_two_runs_with_the_same_names_step_independently(shm_server, kind) -> None:
    """A GAN's G and D (same parameter names, different algorithms) in two runs: each run
    matches its in-process optimizer bit for bit, and each run's end_iteration is its own."""
    url = shm_server.url if kind == "http" else shm_server.shm_url
    configs = {"g": ("adamw", {"lr": 1e-2}), "d": ("sgd", {"lr": 0.1, "momentum": 0.9})}
    got, want = {}, {}
    with (
        connect(url, "adamw", run=f"gan-g-{kind}", fresh=True, lr=1e-2) as g,
        connect(url, "sgd", run=f"gan-d-{kind}", fresh=True, lr=0.1, momentum=0.9) as d,
    ):
        got["g"], got["d"] = params(0), params(1)
        for it in range(5):  # interleaved, as a GAN trains
            train(g, got["g"], seed=10 + it, iterations=1)
            train(d, got["d"], seed=20 + it, iterations=1)
        train(g, got["g"], seed=99, iterations=1)  # G one iteration ahead
        assert g.state_dict()["global_step"] == 6
        assert d.state_dict()["global_step"] == 5
    for key, seed in (("g", 0), ("d", 1)):
        algorithm, hp = configs[key]
        with connect("local://?backend=cpu", algorithm, **hp) as local:
            want[key] = params(seed)
            for it in range(5):
                train(local, want[key], seed=(10 if key == "g" else 20) + it, iterations=1)
            if key == "g":
                train(local, want[key], seed=99, iterations=1)
        for n in SHAPES:
            np.testing.assert_array_equal(got[key][n], want[key][n], err_msg=f"{key} {n}")


def test_anonymous_optimizers_in_one_process_are_independent(shm_server) -> None:
    """Two optimizers on one server with the same names: neither sees the other's weights
    (no "server's copy wins" across them), each has its own step; closing deletes them."""
    before = set(runs(shm_server.url))
    a_params, b_params = params(0), params(1)
    with (
        connect(shm_server.url, "adamw", lr=1e-2) as a,
        connect(shm_server.shm_url, "adamw", lr=1e-2) as b,
    ):
        assert a.run != b.run
        assert a.run.startswith("anon-")
        assert b.run.startswith("anon-")
        train(a, a_params, seed=3, iterations=2)
        train(b, b_params, seed=3, iterations=1)
        assert a.state_dict()["global_step"] == 2
        assert b.state_dict()["global_step"] == 1
        with connect("local://?backend=cpu", "adamw", lr=1e-2) as local:
            ref = params(1)  # b started from its own values, not a's
            train(local, ref, seed=3, iterations=1)
        for n in SHAPES:
            np.testing.assert_array_equal(b_params[n], ref[n])
        assert {a.run, b.run} <= set(runs(shm_server.url))
    assert set(runs(shm_server.url)) == before  # both deleted when they closed


def test_a_rerun_script_starts_fresh_and_a_named_run_resumes(shm_server) -> None:
    url = shm_server.url
    first = params(0)
    with connect(url, "adamw", run="resume-me", fresh=True, lr=1e-2) as opt:
        train(opt, first, seed=5, iterations=3)
    # joining the named run again: the server's copy wins, the step goes on
    again = params(7)
    with connect(url, "adamw", run="resume-me", lr=1e-2) as opt:
        opt.register("fc.weight", SHAPES["fc.weight"], again["fc.weight"])
        np.testing.assert_array_equal(again["fc.weight"], first["fc.weight"])
        assert opt.state_dict()["global_step"] == 3
    # fresh=True deletes it first: our values, step 0
    fresh = params(7)
    with connect(url, "adamw", run="resume-me", fresh=True, lr=1e-2) as opt:
        opt.register("fc.weight", SHAPES["fc.weight"], fresh["fc.weight"])
        np.testing.assert_array_equal(fresh["fc.weight"], params(7)["fc.weight"])
        assert opt.state_dict()["global_step"] == 0
    # a sweep: the same names with another lr in another run is no conflict
    with connect(url, "adamw", run="resume-me-lr2", fresh=True, lr=2e-2) as opt:
        train(opt, params(0), seed=5, iterations=1)
    for name in ("resume-me", "resume-me-lr2"):
        assert httpx.delete(f"{url}/v1/runs/{name}").status_code == 204


def test_deleting_a_run_frees_its_memory_at_once(shm_server) -> None:
    url = shm_server.url
    before = httpx.get(f"{url}/v1/status").json()["device_bytes"]
    n = 1 << 20
    with connect(url, "adamw", run="to-delete", fresh=True, lr=1e-2) as opt:
        opt.step("big", (n,), np.zeros(n, np.float32), np.ones(n, np.float32))
        held = httpx.get(f"{url}/v1/status").json()["device_bytes"]
        assert held - before == 3 * 4 * n  # the param and two AdamW slots
        assert httpx.get(f"{url}/v1/runs/to-delete").json()["device_bytes"] == 3 * 4 * n
    assert "to-delete" in runs(url)  # a named run outlives its clients
    assert httpx.delete(f"{url}/v1/runs/to-delete").status_code == 204
    assert httpx.get(f"{url}/v1/status").json()["device_bytes"] == before
    assert httpx.get(f"{url}/v1/runs/to-delete").status_code == 404
    assert httpx.delete(f"{url}/v1/runs/to-delete").status_code == 404


def test_checkpoints_belong_to_their_run(shm_server) -> None:
    url = shm_server.url
    with (
        connect(url, "sgd", run="ck-a", fresh=True, lr=0.1) as a,
        connect(url, "sgd", run="ck-b", fresh=True, lr=0.1) as b,
    ):
        train(a, params(0), seed=1, iterations=1)
        train(b, params(0), seed=2, iterations=1)
        assert (
            httpx.post(f"{url}/v1/runs/ck-a/checkpoints", json={"name": "mine"}).status_code == 201
        )
        assert [c["name"] for c in httpx.get(f"{url}/v1/runs/ck-a/checkpoints").json()] == ["mine"]
        assert httpx.get(f"{url}/v1/runs/ck-b/checkpoints").json() == []
        r = httpx.post(f"{url}/v1/runs/ck-b/checkpoints/mine/restore")
        assert r.status_code == 404
    assert (shm_server.dir / "ckpt" / "ck-a" / "mine.safetensors").exists()
    for name in ("ck-a", "ck-b"):
        httpx.delete(f"{url}/v1/runs/{name}")


CLIENT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from stepd.client import connect
    opt = connect(sys.argv[1], "sgd", lr=0.1)
    opt.step("w", (4,), np.ones(4, np.float32), np.ones(4, np.float32))
    print(opt.run, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.parametrize("kind", ["http", "shm"])
def test_a_killed_clients_anonymous_run_goes_away(kind) -> None:
    """Over http:// the server reaps it after the idle TTL; over shm:// the connection drop
    deletes it at once."""
    with ShmServer(STEPD_ANONYMOUS_RUN_TTL="1") as srv:
        url = srv.url if kind == "http" else srv.shm_url
        proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, url], stdout=subprocess.PIPE, text=True
        )
        try:
            name = proc.stdout.readline().strip()
            assert name.startswith("anon-"), name
            assert name in runs(srv.url)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert wait_until(lambda: name not in runs(srv.url), timeout=15), runs(srv.url)
            metrics = httpx.get(f"{srv.url}/metrics").text
            assert f'run="{name}"' not in metrics  # its series went with it
        finally:
            proc.kill()
            proc.wait()


def test_a_live_shm_connection_keeps_its_anonymous_run_past_the_ttl() -> None:
    with (
        ShmServer(STEPD_ANONYMOUS_RUN_TTL="0.2") as srv,
        connect(srv.shm_url, "sgd", lr=0.1) as opt,
    ):
        p = np.ones(4, np.float32)
        opt.step("w", (4,), p, np.ones(4, np.float32))
        time.sleep(1.0)  # idle for five TTLs, but the connection holds it
        assert opt.run in runs(srv.url)
        opt.step("w", (4,), p, np.ones(4, np.float32))
        np.testing.assert_allclose(p, 0.8)


def test_shm_iterations_autosave_and_reach_metrics() -> None:
    """end_iteration over shm:// is the engine's, as over HTTP: it autosaves and shows in
    /metrics, and shm steps count there too."""
    with ShmServer(STEPD_AUTOSAVE_EVERY="1", STEPD_AUTOSAVE_KEEP="5") as srv:
        with connect(srv.shm_url, "sgd", run="auto", lr=0.1) as opt:
            p = np.ones(4, np.float32)
            for _ in range(3):
                opt.step("w", (4,), p, np.ones(4, np.float32))
                opt.end_iteration()
        saved = [c["name"] for c in httpx.get(f"{srv.url}/v1/runs/auto/checkpoints").json()]
        assert saved == ["auto-00000001", "auto-00000002", "auto-00000003"]
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'stepd_global_step{run="auto"} 3.0' in metrics
        assert (
            'stepd_steps_total{group="sgd-' in metrics or 'stepd_steps_total{run="auto"' in metrics
        )
        steps = [line for line in metrics.splitlines() if line.startswith("stepd_steps_total{")]
        assert len(steps) == 1, steps
        assert 'run="auto"' in steps[0]
        assert steps[0].endswith(" 3.0"), steps
        assert 'stepd_step_seconds_count{transport="shm"} 3.0' in metrics
