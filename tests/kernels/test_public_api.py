"""The kernels package exports what it documents, sorted (httpx's convention)."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize(
    "module", ["stepd.kernels", "stepd.kernels.algorithms", "stepd.kernels.backends"]
)
def test_all_lists_the_public_names(module: str) -> None:
    mod = importlib.import_module(module)
    public = {n for n in vars(mod) if not n.startswith("_")}
    assert sorted(mod.__all__) == mod.__all__
    assert set(mod.__all__) <= public
