"""The stand-in's ``cupyx.scipy.linalg`` (see ``cupy``): triangular solves on device arrays."""

from __future__ import annotations

from typing import Any

import cupy
import numpy as np


def solve_triangular(
    a: Any, b: Any, trans: int | str = 0, lower: bool = False, unit_diagonal: bool = False, **_: Any
) -> Any:
    a_, b_ = cupy._dev(a), cupy._dev(b)
    if trans in (1, "T"):
        a_, lower = a_.T, not lower
    tri = np.tril(a_) if lower else np.triu(a_)
    if unit_diagonal:
        np.fill_diagonal(tri, 1)
    return cupy._wrap(np.linalg.solve(tri, b_).astype(np.result_type(a_, b_)))
