"""The `stepd` console script, as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest


def _stepd() -> list[str]:
    exe = shutil.which("stepd")
    return [exe] if exe else [sys.executable, "-m", "stepd.service.cli"]


@pytest.mark.e2e
def test_demo_runs_a_server_and_workers_end_to_end() -> None:
    proc = subprocess.run(
        [*_stepd(), "demo", "--workers", "2"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "60/60" in proc.stdout
    accuracy = next(line for line in proc.stdout.splitlines() if "held-out accuracy" in line)
    assert float(accuracy.split(": ")[1].split("%")[0]) >= 85.0
    assert "/docs" in proc.stdout
    dashboard = next(line for line in proc.stdout.splitlines() if "the dashboard" in line)
    assert dashboard.split()[0].endswith("/")  # the server's root


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["async", "elastic"])
def test_demo_shows_async_and_elastic_workers(mode: str) -> None:
    proc = subprocess.run(
        [*_stepd(), "demo", "--workers", "3", "--mode", mode],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr  # held-out accuracy >= 85%
    lines = proc.stdout.splitlines()
    assert "60/60" in proc.stdout
    if mode == "async":
        shares = [line for line in lines if "% accepted, " in line]
        assert [line.split(":")[0].strip() for line in shares] == [
            "worker-0",
            "worker-1",
            "worker-2",
        ]
        for line in shares:  # each worker's accepted and stale fractions add up
            accepted, stale = (int(part.split("%")[0].split()[-1]) for part in line.split(","))
            assert accepted + stale == 100, line
    else:
        members = next(line for line in lines if line.startswith("workers per iteration: "))
        spans = dict(part.split(": ") for part in members.split(": ", 1)[1].split(", "))
        # worker-2 is away from after iteration 20 until it joins again after 40
        assert spans[next(s for s in spans if s.startswith("1-"))] == "3", members
        assert "2" in spans.values(), members
        assert list(spans.values())[-1] == "3", members


def test_tour_trains_every_algorithm() -> None:
    proc = subprocess.run(
        [*_stepd(), "tour", "--steps", "150"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {
        line.split()[0]: line.split()
        for line in proc.stdout.splitlines()
        if line and line.split()[0] in {"sgd", "adamw", "lion"}
    }
    assert set(rows) == {"sgd", "adamw", "lion"}
    for name, cols in rows.items():
        start, end = float(cols[1]), float(cols[2])
        assert end < start, f"{name} did not reduce the loss: {cols}"


def test_unknown_command_is_a_usage_error() -> None:
    proc = subprocess.run([*_stepd(), "fly"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice: 'fly'" in proc.stderr


def test_serve_lets_its_openmp_threads_sleep_unless_told_otherwise(tmp_path) -> None:
    """`stepd serve` shares its host with training processes: its kernels' threads must not
    spin between steps (libgomp's default), unless the operator asks for it."""
    import os

    code = (
        "import os, sys, uvicorn\n"
        "uvicorn.run = lambda *a, **k: print('policy', os.environ.get('OMP_WAIT_POLICY'))\n"
        "from stepd.service.cli import main\n"
        "sys.exit(main(['serve', '--checkpoint-dir', sys.argv[1], '--device', 'cpu']))\n"
    )
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for extra, want in (({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")):
        proc = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            env={**base, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"policy {want}" in proc.stdout.splitlines(), proc.stdout
