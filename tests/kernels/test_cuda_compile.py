"""Every CUDA kernel compiles, on machines without a GPU.

The exact translation unit the CUDA backend hands to CuPy (``cuda_source()``) is compiled by
NVRTC, the run-time compiler CuPy uses (its low-level binding needs no driver), and by nvcc.
Where a compiler is missing the test is skipped, unless ``STEPD_REQUIRE_CUDA_COMPILERS=1``
(set by CI, whose machines have both) turns the skip into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from stepd.kernels.backends.cuda_source import NVRTC_OPTIONS, cuda_source

REQUIRED = os.environ.get("STEPD_REQUIRE_CUDA_COMPILERS") == "1"
OPS = re.findall(r"^STEPD_OP\((\w+),", cuda_source(), re.M)


def _unavailable(why: str) -> None:
    if REQUIRED:
        pytest.fail(f"{why} (STEPD_REQUIRE_CUDA_COMPILERS=1)")
    pytest.skip(why)


def _expected_entries() -> set[str]:
    tables = {f"stepd_{op}_multi{suffix}" for op in OPS for suffix in ("", "_bf16", "_f16")}
    return {f"stepd_{op}" for op in OPS} | tables


def _entries(ptx: str) -> set[str]:
    return set(re.findall(r"\.entry\s+(\w+)\(", ptx))


def test_source_lists_ops() -> None:
    assert "adam" in OPS
    assert '#include "' not in cuda_source()  # self-contained: CuPy's cache key covers it all


def test_nvrtc_compiles_every_kernel() -> None:
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:
        _unavailable(f"CuPy's NVRTC binding is not installed: {exc}")
    try:
        prog = nvrtc.createProgram(cuda_source(), "stepd.cu", [], [])
    except Exception as exc:  # libnvrtc missing
        _unavailable(f"NVRTC unavailable: {exc}")
    try:
        nvrtc.compileProgram(prog, ["-arch=compute_90", *NVRTC_OPTIONS])
    except nvrtc.NVRTCError as exc:
        pytest.fail(f"NVRTC rejected the kernels: {exc}\n{nvrtc.getProgramLog(prog)}")
    ptx = nvrtc.getPTX(prog).decode()
    assert _entries(ptx) == _expected_entries()


def test_nvcc_compiles_every_kernel(tmp_path) -> None:
    nvcc = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    )
    if nvcc is None:
        _unavailable("nvcc not found")
    src = tmp_path / "stepd.cu"
    src.write_text(cuda_source())
    out = tmp_path / "stepd.ptx"
    flags = ["-arch=sm_90", "--fmad=false", "-std=c++17", "--ptx", "-Werror", "all-warnings"]
    proc = subprocess.run([nvcc, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert _entries(out.read_text()) == _expected_entries()
