"""Fixtures: real ``stepd serve`` processes (one shared, or one per test for a fresh global
step); each holds the named run ``t`` that tests join with ``connect_shared``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.server import Server, ShmServer


@pytest.fixture
def server(tmp_path) -> Iterator[Server]:
    """A server of its own: global step 0, no params."""
    with Server(tmp_path / "ckpt") as s:
        yield s


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory) -> Iterator[Server]:
    """One server for the whole session: tests use their own names and never assume step 0."""
    with Server(tmp_path_factory.mktemp("ckpt")) as s:
        yield s


@pytest.fixture(scope="session")
def shm_server() -> Iterator[ShmServer]:
    """One server for the session that speaks http:// and shm://; tests use anonymous runs."""
    with ShmServer() as s:
        yield s
