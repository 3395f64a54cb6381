"""Fixtures: an app with its lifespan running (TestClient) and helpers to compare state."""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from stepd.service.app import create_app
from stepd.service.config import Settings


RUN = "t"  # the run the tests below work in (paths /v1/runs/t/...)


class RunClient(TestClient):
    """A TestClient whose app, once started, holds the named run ``t``."""

    def __enter__(self) -> RunClient:
        super().__enter__()
        settings = self.app.state.settings
        headers = {"authorization": f"Bearer {settings.token}"} if settings.token else {}
        assert self.post("/v1/runs", json={"name": RUN}, headers=headers).status_code == 201
        return self

    @property
    def store(self):
        return self.app.state.engine.run(RUN).store


def make_client(tmp_path, **overrides) -> RunClient:
    settings = Settings(checkpoint_dir=tmp_path / "ckpt", device="cpu", **overrides)
    return RunClient(create_app(settings))


@pytest.fixture
def client(tmp_path) -> Iterator[TestClient]:
    with make_client(tmp_path) as c:
        yield c


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, np.float32).tobytes()).decode()


def register(client, name="w", shape=(2, 3), algorithm="adamw", value=None, **hp):
    body = {
        "name": name,
        "shape": list(shape),
        "group": {"algorithm": algorithm, "hyperparams": hp},
    }
    if value is not None:
        body["value"] = b64(value)
    return client.post("/v1/runs/t/params", json=body)


def full_state(client) -> tuple[dict, dict]:
    """Every param and slot (host copies) and the metadata: what must not change."""
    return client.store.write_snapshot(
        lambda tensors, meta: ({k: np.array(v, copy=True) for k, v in tensors.items()}, meta)
    )


def assert_same_state(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert a[1] == b[1]
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k], err_msg=k)


def pytest_collection_modifyitems(config, items) -> None:
    """``soak`` tests (long variants) run only when asked: ``-m soak`` or STEPD_SOAK=1."""
    if "soak" in (config.getoption("-m") or "") or os.environ.get("STEPD_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="soak test: run with -m soak or STEPD_SOAK=1")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
