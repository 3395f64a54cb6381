"""The one gate for GPU tests: CuPy and a usable device, or a skip that says which is missing.

``STEPD_REQUIRE_GPU=1`` (a GPU machine's check, ``bench/gpu_check.py``) turns every such
skip into a failure, so a GPU run cannot pass by skipping. Under ``STEPD_TEST_FAKE_CUDA=1``
the tests run on the CuPy stand-in (tests/support/fakecupy), which checks the Python side
only: with ``STEPD_REQUIRE_GPU=1`` that is a failure too, never a GPU run.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

import pytest

from tests.support.fakecuda import is_stand_in

REQUIRE_GPU = os.environ.get("STEPD_REQUIRE_GPU") == "1"


def _unusable(why: str) -> NoReturn:
    if REQUIRE_GPU:
        pytest.fail(f"{why} (STEPD_REQUIRE_GPU=1)")
    pytest.skip(why)


def cuda_or_skip() -> Any:
    """The ``cupy`` module when a CUDA device is usable (or the stand-in, under
    ``STEPD_TEST_FAKE_CUDA=1``); otherwise skip the calling test (fail if required)."""
    try:
        import cupy
    except ImportError:
        _unusable("CuPy is not installed")
    if is_stand_in(cupy) and REQUIRE_GPU:
        pytest.fail("the CuPy stand-in is not a GPU (STEPD_REQUIRE_GPU=1)")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            _unusable("no CUDA device")
    except Exception as exc:  # no driver, or one too old for the runtime
        _unusable(f"no usable CUDA device: {exc}")
    return cupy
