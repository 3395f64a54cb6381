"""The `stepd` console script, as a user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys


def _stepd() -> list[str]:
    exe = shutil.which("stepd")
    return [exe] if exe else [sys.executable, "-m", "service.cli"]


def test_demo_trains_every_algorithm() -> None:
    proc = subprocess.run(
        [*_stepd(), "demo", "--steps", "150"], capture_output=True, text=True, timeout=300
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
