"""Fixtures: an app with its lifespan running (a TestClient holding the run ``t``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.app import RunClient, make_client


@pytest.fixture
def client(tmp_path) -> Iterator[RunClient]:
    with make_client(tmp_path) as c:
        yield c


def pytest_collection_modifyitems(config, items) -> None:
    """``soak`` tests (long variants) run only when asked: ``-m soak`` or STEPD_SOAK=1."""
    if "soak" in (config.getoption("-m") or "") or os.environ.get("STEPD_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="soak test: run with -m soak or STEPD_SOAK=1")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
