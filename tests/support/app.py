"""The app in process (a TestClient running its lifespan) and helpers for its state."""

from __future__ import annotations

import base64

import numpy as np
from fastapi.testclient import TestClient
from stepd.service.app import create_app
from stepd.service.config import Settings

from tests.support import fakecuda

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
    settings = Settings(checkpoint_dir=tmp_path / "ckpt", device=fakecuda.STORE_DEVICE, **overrides)
    return RunClient(create_app(settings))


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


def assert_same_snapshot(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    assert a[1] == b[1]
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k], err_msg=k)
