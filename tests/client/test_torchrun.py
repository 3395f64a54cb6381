"""``workers="torchrun"``: two processes started by torchrun are one sync group of a real
server, and train exactly as one process would on the union of their batches."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
import torch
from stepd.client.optimizer import _launcher_workers

from tests.support.server import Server, free_port

pytestmark = pytest.mark.e2e  # starts a real server and torchrun

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "torchrun_sync.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("torchrun_sync", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_torchrun_ranks_equal_one_process_on_the_union_of_their_batches(tmp_path) -> None:
    steps, run = 10, "torchrun-test"
    out = tmp_path / "out"
    with Server(tmp_path / "ckpt", run=None) as server:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc_per_node=2",
            f"--master-port={free_port()}",
            f"--rdzv-id={run}",
            str(EXAMPLE),
            f"--url={server.url}",
            f"--run-name={run}",
            f"--steps={steps}",
            f"--out={out}",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        info = httpx.get(f"{server.url}/v1/runs/{run}").json()
        workers = sorted(w["id"] for w in httpx.get(f"{server.url}/v1/runs/{run}/workers").json())
    assert info["global_step"] == steps
    assert workers == ["0", "1"]  # the ranks
    ranks = [dict(np.load(out / f"rank{r}.npz")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() == {"weight", "bias"}
    for name in ranks[0]:
        np.testing.assert_array_equal(ranks[0][name], ranks[1][name])  # bit for bit

    # One process, the whole batch, torch.optim.AdamW: what the two ranks must have computed.
    ex = _example()
    model = ex.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=ex.LR)
    for step in range(steps):
        x, y = ex.global_batch(step)
        opt.zero_grad()
        ex.loss_of(model, x, y).backward()
        opt.step()
    for name, t in model.named_parameters():
        want = t.detach().numpy()
        rel = np.linalg.norm(ranks[0][name] - want) / np.linalg.norm(want)
        assert rel <= 1e-6, (name, rel)
        assert not np.allclose(want, ex.make_model().state_dict()[name].numpy())  # it trained


def test_the_launchers_environment_completes_sync_workers() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "4", "TORCHELASTIC_RUN_ID": "job"}
    assert _launcher_workers(None, "torchrun", env) == ("3", {"mode": "sync", "count": 4})
    sync = {"mode": "sync", "timeout_s": 5.0}
    assert _launcher_workers(None, sync, env) == (
        "3",
        {"mode": "sync", "count": 4, "timeout_s": 5.0},
    )
    assert _launcher_workers("me", {"mode": "sync", "count": 2}, env) == (
        "me",
        {"mode": "sync", "count": 2},
    )  # explicit wins
    asynchronous = {"mode": "async", "max_staleness": 2}
    assert _launcher_workers("w", asynchronous, env) == ("w", asynchronous)  # sync only
    assert _launcher_workers(None, sync, {}) == (None, sync)  # not under a launcher
    with pytest.raises(ValueError, match="start the script with torchrun"):
        _launcher_workers(None, "torchrun", {})
    with pytest.raises(ValueError, match="mapping or 'torchrun'"):
        _launcher_workers(None, "mpirun", env)
    with pytest.raises(ValueError, match="must be in"):
        _launcher_workers(None, "torchrun", {"RANK": "4", "WORLD_SIZE": "4"})
