"""``STEPD_TEST_FAKE_CUDA=1``: the suite's CUDA stores and GPU tests run on the CuPy
stand-in (``tests/support/fakecupy``), which checks the Python side of the device path
(host/device crossings, compile, load, launch tables) and is NEVER a GPU run.

:func:`activate` (called by ``tests/conftest.py`` before anything imports CuPy) puts the
stand-in first on ``sys.path`` and on ``PYTHONPATH`` (for the servers tests start); nothing
else ever imports it, so it cannot shadow the real CuPy outside these test runs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENABLED = os.environ.get("STEPD_TEST_FAKE_CUDA") == "1"
FOLDER = Path(__file__).resolve().parent / "fakecupy"
# The device of the stores the tests create (in-process and in server processes).
STORE_DEVICE = "cuda" if ENABLED else "cpu"


def activate() -> None:
    if not ENABLED:
        return
    loaded = sys.modules.get("cupy")
    if loaded is not None and not getattr(loaded, "IS_STAND_IN", False):
        raise RuntimeError("STEPD_TEST_FAKE_CUDA=1 but the real CuPy was imported first")
    sys.path.insert(0, str(FOLDER))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(FOLDER), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    import cupy

    assert cupy.IS_STAND_IN, cupy.__file__


def server_env() -> dict[str, str]:
    """The environment of a ``stepd serve --device cuda`` process that runs on the stand-in,
    whatever this test run's switch (for a test that wants a CUDA store in any run)."""
    return {
        "PYTHONPATH": os.pathsep.join([str(FOLDER), *filter(None, [os.environ.get("PYTHONPATH")])])
    }


def nvrtc_missing() -> str | None:
    """Why the stand-in cannot load the kernels here (it loads NVRTC-built PTX), if so."""
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # the binding or libnvrtc missing
        return f"the stand-in loads NVRTC-built kernels: NVRTC unavailable: {exc}"
    return None


def is_stand_in(module: object) -> bool:
    return bool(getattr(module, "IS_STAND_IN", False))


_NAMES = ("cupy", "cupyx", "cupy._environment", "cupyx.scipy", "cupyx.scipy.linalg")


def _is_cupy(name: str) -> bool:
    return name.split(".")[0] in ("cupy", "cupyx")


@contextlib.contextmanager
def stand_in() -> Iterator[Any]:
    """The stand-in as ``cupy`` for the duration of the block (the real modules, if any,
    are put back after it), with the CUDA backend's caches cleared on both sides."""
    from stepd.kernels.backends import cuda, get_backend

    if ENABLED:
        import cupy

        yield cupy
        return
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if _is_cupy(k)}
    sys.path.insert(0, str(FOLDER))
    get_backend.cache_clear()
    cuda._module.cache_clear()
    try:
        for name in _NAMES:
            importlib.import_module(name)
        yield sys.modules["cupy"]
    finally:
        sys.path.remove(str(FOLDER))
        for k in [k for k in sys.modules if _is_cupy(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
        get_backend.cache_clear()
        cuda._module.cache_clear()
