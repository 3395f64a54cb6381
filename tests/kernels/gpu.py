"""The one gate for GPU tests: CuPy and a usable device, or a skip that says which is missing."""

from __future__ import annotations

from typing import Any

import pytest


def cuda_or_skip() -> Any:
    """The ``cupy`` module when a CUDA device is usable; otherwise skip the calling test."""
    try:
        import cupy
    except ImportError:
        pytest.skip("CuPy is not installed")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as exc:  # no driver, or one too old for the runtime
        pytest.skip(f"no usable CUDA device: {exc}")
    return cupy
