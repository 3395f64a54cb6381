"""The container dev stack: docker-compose.yml validates, the Dockerfile has its stages, and the
example worker trains against a real server. No Docker engine runs here: the images themselves
are not built by these tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.server import Server

pytestmark = pytest.mark.e2e  # starts real server processes

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "examples" / "worker.py"


def compose_command() -> list[str] | None:
    """``docker compose`` (the v2 plugin) or the standalone ``docker-compose``, if present."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_is_valid() -> None:
    cmd = compose_command()
    if cmd is None:
        pytest.skip("no docker compose client (neither `docker compose` nor `docker-compose`)")
    proc = subprocess.run(
        [*cmd, "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_compose_publishes_on_localhost_only() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    published = re.findall(r'^\s*-\s*"?([0-9.:]+:\d+)"?', text, re.MULTILINE)
    ports = [p for p in published if p.count(":") >= 2]
    assert ports, "no published ports found"
    assert all(p.startswith("127.0.0.1:") for p in ports), ports
    assert "condition: service_healthy" in text
    assert (ROOT / "prometheus" / "prometheus.yml").read_text().count("stepd:8000") == 1


def stages(dockerfile: str) -> dict[str, str]:
    """Stage name -> its text (from its FROM to the next FROM)."""
    parts = re.split(r"^(?=FROM )", dockerfile, flags=re.MULTILINE)
    out = {}
    for part in parts[1:]:
        m = re.match(r"FROM \S+ AS (\S+)", part)
        assert m, f"unnamed stage: {part.splitlines()[0]}"
        out[m.group(1)] = part
    return out


def test_dockerfile_stages() -> None:
    by_name = stages((ROOT / "Dockerfile").read_text())
    assert list(by_name) == ["build", "cuda", "runtime"]  # the last is the default target
    build, cuda, runtime = by_name["build"], by_name["cuda"], by_name["runtime"]

    assert build.startswith("FROM python:${PYTHON_VERSION}-slim")
    assert runtime.startswith("FROM python:${PYTHON_VERSION}-slim")
    assert cuda.startswith("FROM ${CUDA_IMAGE}")
    for needle in ("g++", '".[server]"', "get_backend('cpu')"):  # kernels compiled at build
        assert needle in build, needle
    for needle in (
        "libgomp1",
        "COPY --from=build /opt/venv",
        "STEPD_CPU_LIBRARY",
        "STEPD_BIND_LIBRARY",
    ):
        assert needle in runtime, needle
    assert "g++" not in runtime  # no compiler in the default image
    assert '".[server,gpu]"' in cuda
    import tomllib

    folders = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ].values()
    for stage in (build, cuda):  # every folder the stepd package is made of goes in
        for folder in folders:
            assert f"COPY {folder} ./{folder}" in stage, folder
    for stage in (runtime, cuda):
        assert re.search(r"^USER stepd$", stage, re.MULTILINE)
        assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", stage, re.MULTILINE)
        for needle in (
            "EXPOSE 8000",
            'VOLUME ["/data"]',
            "chown -R stepd:stepd /data",
            '"--host", "0.0.0.0"',
            '"--checkpoint-dir", "/data/checkpoints"',
        ):
            assert needle in stage, needle


def run_worker(url: str, worker: int, steps: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, str(WORKER), "--url", url, f"--worker={worker}", f"--steps={steps}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_example_workers_train_one_shared_model(tmp_path) -> None:
    steps = 40
    with Server(tmp_path / "ckpt") as server:
        procs = [run_worker(server.url, w, steps) for w in (1, 2)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        for p, out in zip(procs, outs, strict=True):
            assert p.returncode == 0, out  # the worker exits 1 if its loss did not go down
            assert "done: loss" in out
        params = {p["name"]: p for p in httpx.get(f"{server.url}/v1/runs/example/params").json()}
    assert set(params) == {"model.weight", "model.bias"}
    # Both workers stepped the same parameters: every gradient was applied.
    assert all(p["version"] == 2 * steps for p in params.values()), params
