"""Load: 8 clients stepping, reading and a checkpoint in the middle, against the real server.

No error, no lost update, the final state (and the checkpoint taken under load) equal a serial
replay, and the server's resident memory does not grow after warm-up.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file
from stepd.kernels import create_optimizer

from tests.support.server import Server

pytestmark = pytest.mark.e2e  # starts real server processes

CLIENTS, SIZE = 8, 4096
LR = 2.0**-10  # the shared SGD param: exactly representable steps, any order same bits
HP = {"lr": 1e-3, "weight_decay": 0.01}
RSS_GROWTH_LIMIT = 16 << 20


def _grad(i: int, version: int) -> np.ndarray:
    return np.random.default_rng(i * 1_000_003 + version).standard_normal(SIZE, dtype=np.float32)


def _reference(i: int, steps: int) -> list[np.ndarray]:
    """own{i} after 0..steps serial steps (AdamW, the per-parameter step count)."""
    opt = create_optimizer("adamw", backend="cpu", **HP)
    p = np.zeros(SIZE, np.float32)
    out = [p.copy()]
    for v in range(steps):
        opt.step(f"own{i}", (SIZE,), p, _grad(i, v + 1))
        out.append(p.copy())
    return out


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _load(tmp_path: Path, steps: int) -> None:
    root = tmp_path / "ckpt"
    progress = [0] * CLIENTS
    problems: list[str] = []
    with Server(root) as server:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for name, algo, hp in [("shared", "sgd", {"lr": LR})] + [
                (f"own{i}", "adamw", HP) for i in range(CLIENTS)
            ]:
                body = {
                    "name": name,
                    "shape": [SIZE],
                    "group": {"algorithm": algo, "hyperparams": hp},
                }
                assert c.post("/v1/runs/t/params", json=body).status_code == 201

        def work(i: int) -> None:
            with httpx.Client(base_url=server.url, timeout=30) as c:
                for k in range(steps):
                    read_back = k % 2 == 0
                    r = c.post(
                        f"/v1/runs/t/params/own{i}/step?return_param={str(read_back).lower()}",
                        content=_grad(i, k + 1).tobytes(),
                    )
                    if r.status_code != (200 if read_back else 204):
                        problems.append(f"own{i} step {k}: {r.status_code} {r.text[:200]}")
                        return
                    if r.headers["x-stepd-version"] != str(k + 1):
                        problems.append(
                            f"own{i}: version {r.headers['x-stepd-version']} != {k + 1}"
                        )
                    r = c.post("/v1/runs/t/params/shared/step?return_param=false", content=ONES)
                    if r.status_code != 204:
                        problems.append(f"shared step: {r.status_code} {r.text[:200]}")
                        return
                    if k % 10 == 0:  # inspection reads mixed in
                        shared = np.frombuffer(
                            c.get("/v1/runs/t/params/shared/value").content, "f4"
                        )
                        if shared.min() != shared.max() or shared[0] % np.float32(LR):
                            problems.append(f"torn or odd read of shared: {shared[:2]}")
                        for url in (
                            f"/v1/runs/t/params/own{i}/stats",
                            "/v1/status",
                            "/v1/runs/t/params",
                        ):
                            r = c.get(url)
                            if r.status_code != 200:
                                problems.append(f"GET {url}: {r.status_code}")
                        r = c.get(f"/v1/runs/t/params/own{i}/state/exp_avg")
                        if r.status_code != 200 or len(r.content) != SIZE * 4:
                            problems.append(f"slot read: {r.status_code}")
                    progress[i] = k + 1

        refs: dict[int, list[np.ndarray]] = {}

        def references() -> None:  # computed while the server works
            for i in range(CLIENTS):
                refs[i] = _reference(i, steps)

        ref_thread = threading.Thread(target=references)
        ref_thread.start()
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(work, i) for i in range(CLIENTS)]
            deadline = time.monotonic() + 300
            while min(progress) < steps // 4 and time.monotonic() < deadline:
                time.sleep(0.005)
            warm_rss = _rss(server.proc.pid)  # after warm-up: every client a quarter in
            while sum(progress) < CLIENTS * steps // 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            with httpx.Client(base_url=server.url, timeout=30) as c:
                r = c.post("/v1/runs/t/checkpoints", json={"name": "mid"})
                assert r.status_code == 201, r.text
            for f in futures:
                f.result()
        end_rss = _rss(server.proc.pid)
        ref_thread.join()
        assert problems == []

        with httpx.Client(base_url=server.url, timeout=30) as c:
            infos = {p["name"]: p for p in c.get("/v1/runs/t/params").json()}
            assert infos["shared"]["version"] == CLIENTS * steps  # no lost update
            shared = np.frombuffer(c.get("/v1/runs/t/params/shared/value").content, np.float32)
            np.testing.assert_array_equal(shared, np.float32(-LR * CLIENTS * steps))
            for i in range(CLIENTS):
                assert infos[f"own{i}"]["version"] == steps
                own = np.frombuffer(c.get(f"/v1/runs/t/params/own{i}/value").content, np.float32)
                np.testing.assert_array_equal(own, refs[i][steps])

        # The checkpoint taken under load is one consistent cut: each param as the replay
        # had it at the version the checkpoint records.
        tensors = load_file(str(root / "t" / "mid.safetensors"))
        with safe_open(str(root / "t" / "mid.safetensors"), "np") as f:
            meta = json.loads(f.metadata()["stepd"])
        v = meta["params"]["shared"]["version"]
        assert 0 < v < CLIENTS * steps
        np.testing.assert_array_equal(tensors["param/shared"], np.float32(-LR * v))
        for i in range(CLIENTS):
            v = meta["params"][f"own{i}"]["version"]
            np.testing.assert_array_equal(tensors[f"param/own{i}"], refs[i][v])
        print(f"server RSS after warm-up {warm_rss >> 20} MiB, at the end {end_rss >> 20} MiB")
        assert end_rss - warm_rss < RSS_GROWTH_LIMIT, (warm_rss, end_rss)


ONES = np.ones(SIZE, np.float32).tobytes()


def test_eight_clients_mixed_load(tmp_path) -> None:
    _load(tmp_path, steps=300)


@pytest.mark.soak
def test_eight_clients_mixed_load_soak(tmp_path) -> None:
    _load(tmp_path, steps=1000)
