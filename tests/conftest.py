"""Suite-wide settings."""

from __future__ import annotations

import pytest

from tests.support import fakecuda

fakecuda.activate()  # STEPD_TEST_FAKE_CUDA=1 only: before anything imports CuPy

# The oracles run in the same process as NumPy's BLAS and our OpenMP kernels; on small
# machines torch's own thread pool then fights them for the cores (steps measured 10-70x
# slower). The oracles are tiny: one thread is plenty.
try:
    import torch
except ImportError:  # the service tests do not need it
    pass
else:
    torch.set_num_threads(1)


# Fixtures that start a real `stepd serve` process: a test that uses one is end-to-end.
SERVER_FIXTURES = {"server", "shared_server", "shm_server", "srv", "twin"}


def pytest_collection_modifyitems(config, items) -> None:
    """``e2e``: every test that starts server processes (a server fixture, or a module or
    test marked so because it starts them itself); ``pytest -m "not e2e"`` is the fast loop."""
    for item in items:
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


def pytest_report_header(config) -> str | None:
    if fakecuda.ENABLED:
        return (
            "STEPD_TEST_FAKE_CUDA=1: CUDA stores and GPU tests run on the CuPy stand-in "
            "(tests/support/fakecupy): host/device handling only, NOT a GPU run"
        )
    return None


@pytest.fixture
def fake_cupy():
    """The CuPy stand-in as ``cupy`` for one test (tests/support/fakecupy: the Python side
    of the CUDA path only, never a GPU run); skipped where NVRTC cannot build the kernels."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # the binding or libnvrtc missing
        pytest.skip(f"the stand-in loads NVRTC-built kernels: NVRTC unavailable: {exc}")
    with fakecuda.stand_in() as cupy:
        yield cupy
