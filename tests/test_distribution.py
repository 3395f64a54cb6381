"""The installed distribution: one import name, ``stepd``, and one version string."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import stepd

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    [built] = out.glob("stepd-*.whl")
    return built


def test_nothing_generic_at_the_top_of_site_packages(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/", 1)[0] for name in zf.namelist()}
    assert tops == {"stepd", f"stepd-{stepd.__version__}.dist-info"}
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "stepd/__init__.py",
        "stepd/wire.py",
        "stepd/kernels/__init__.py",
        "stepd/kernels/csrc/adam.cuh",
        "stepd/service/engine.py",
        "stepd/client/session.py",
        "stepd/client/torch.py",
    ):
        assert expected in names


def test_cli_version_is_the_package_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "stepd.service.cli", "--version"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.strip() == f"stepd {stepd.__version__}"


def test_top_level_names() -> None:
    assert stepd.connect is __import__("stepd.client", fromlist=["connect"]).connect
    assert (
        stepd.create_optimizer
        is __import__("stepd.kernels", fromlist=["create_optimizer"]).create_optimizer
    )
