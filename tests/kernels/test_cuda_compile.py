"""Every CUDA kernel compiles, on machines without a GPU.

NVRTC compiles through the very function the CUDA backend loads its module from
(``build_module``, with an explicit arch where there is no device to ask), and nvcc compiles
the same translation unit. Where a compiler is missing the test is skipped, unless
``STEPD_REQUIRE_CUDA_COMPILERS=1`` (set by CI, whose machines have both) turns the skip into
a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from stepd.kernels.backends.build import KernelBuildError
from stepd.kernels.backends.cuda_source import (
    NVRTC_OPTIONS,
    build_module,
    compile_options,
    cuda_source,
    device_arch,
)

REQUIRED = os.environ.get("STEPD_REQUIRE_CUDA_COMPILERS") == "1"
OPS = re.findall(r"^STEPD_OP\((\w+),", cuda_source(), re.M)
BLOCKWISE_OPS = re.findall(r"^STEPD_BLOCKWISE_OP\((\w+),", cuda_source(), re.M)


def _unavailable(why: str) -> None:
    if REQUIRED:
        pytest.fail(f"{why} (STEPD_REQUIRE_CUDA_COMPILERS=1)")
    pytest.skip(why)


def _expected_entries() -> set[str]:
    tables = {f"stepd_{op}_multi{suffix}" for op in OPS for suffix in ("", "_bf16", "_f16")}
    blockwise = {f"stepd_{op}{suffix}" for op in BLOCKWISE_OPS for suffix in ("", "_bf16", "_f16")}
    return {f"stepd_{op}" for op in OPS} | tables | blockwise


def _entries(ptx: str) -> set[str]:
    return set(re.findall(r"\.entry\s+(\w+)\(", ptx))


def test_source_lists_ops() -> None:
    assert "adam" in OPS
    assert "adam8" in BLOCKWISE_OPS  # the 8-bit ops' list is in the source too
    assert '#include "' not in cuda_source()  # self-contained: one cache key covers it all


def test_options_keep_subnormals_and_separate_roundings() -> None:
    opts = compile_options("compute_90")
    assert opts == [*NVRTC_OPTIONS, "-arch=compute_90"]
    assert "--ftz=false" in opts
    assert "--fmad=false" in opts
    assert not any("ftz=true" in o for o in opts)
    with pytest.raises(ValueError, match="arch"):
        compile_options("90")


def test_device_arch() -> None:
    assert device_arch("90", (80, 90)) == "sm_90"
    assert device_arch("120", (80, 90)) == "compute_90"  # a newer device: PTX, JIT-ed
    with pytest.raises(KernelBuildError):
        device_arch("50", (80, 90))


def test_nvrtc_compiles_every_kernel(tmp_path) -> None:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # the binding or libnvrtc missing
        _unavailable(f"NVRTC unavailable: {exc}")
    path = build_module("compute_90", tmp_path)
    assert _entries(path.read_text()) == _expected_entries()
    assert build_module("compute_90", tmp_path) == path  # cached: no second compile
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_nvcc_compiles_every_kernel(tmp_path) -> None:
    nvcc = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    )
    if nvcc is None:
        _unavailable("nvcc not found")
    src = tmp_path / "stepd.cu"
    src.write_text(cuda_source())
    out = tmp_path / "stepd.ptx"
    flags = [
        "-arch=sm_90",
        "--fmad=false",
        "--ftz=false",
        "-std=c++17",
        "--ptx",
        "-Werror",
        "all-warnings",
    ]
    proc = subprocess.run([nvcc, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _entries(out.read_text()) == _expected_entries()
