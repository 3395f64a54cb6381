"""The stand-in's ``cupyx`` (see ``cupy``): ``errstate``/``seterr`` for linalg errors and
``cupyx.scipy.linalg.solve_triangular``. Never a GPU run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import cupy


def seterr(linalg: str | None = None) -> dict[str, str]:
    old = dict(cupy._LINALG)
    if linalg is not None:
        if linalg not in ("ignore", "raise"):
            raise ValueError(f"linalg must be 'ignore' or 'raise', got {linalg!r}")
        cupy._LINALG["mode"] = linalg
    return {"linalg": old["mode"]}


def geterr() -> dict[str, str]:
    return {"linalg": cupy._LINALG["mode"]}


@contextlib.contextmanager
def errstate(linalg: str | None = None) -> Iterator[None]:
    old = seterr(linalg)
    try:
        yield
    finally:
        seterr(old["linalg"])
