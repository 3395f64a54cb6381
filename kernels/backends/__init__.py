"""Where the fused ops run: ``cpu`` (compiled C++/OpenMP), ``cuda`` (CuPy/NVRTC) or
``reference`` (NumPy, the readable spec). ``get_backend("auto")`` takes the fused CPU
kernels and falls back to NumPy, with a warning, when they cannot be built."""

from __future__ import annotations

import warnings
from functools import cache
from typing import Any

from .build import KernelBuildError

BACKENDS = ("auto", "cpu", "cuda", "reference")


@cache
def get_backend(name: str = "auto") -> Any:
    if name == "cpu":
        from .cpu import CpuBackend

        return CpuBackend()
    if name == "reference":
        from .reference import ReferenceBackend

        return ReferenceBackend()
    if name == "cuda":
        from .cuda import CudaBackend

        return CudaBackend()
    if name == "auto":
        try:
            return get_backend("cpu")
        except KernelBuildError as exc:
            warnings.warn(
                f"fused CPU kernels unavailable, using the NumPy reference path: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
            return get_backend("reference")
    raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "KernelBuildError", "get_backend"]
