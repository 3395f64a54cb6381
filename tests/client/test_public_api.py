"""The client's public surface, and that importing it stays light."""

from __future__ import annotations

import subprocess
import sys

from stepd.client import errors

from stepd import client


def test_all_is_sorted_public_and_importable() -> None:
    assert client.__all__ == sorted(client.__all__)
    for name in client.__all__:
        assert not name.startswith("_")
        assert getattr(client, name) is not None
    assert "connect" in client.__all__
    assert "RemoteOptimizer" not in client.__all__  # torch lives in client.torch only
    with client.connect("local://") as opt:
        assert isinstance(opt, client.Optimizer)  # the runtime-checkable protocol


def test_exception_tree() -> None:
    assert issubclass(errors.TransportError, errors.StepdError)
    assert issubclass(errors.ServerError, errors.StepdError)
    for sub in (
        errors.AuthError,
        errors.NotFoundError,
        errors.ConflictError,
        errors.InvalidRequestError,
    ):
        assert issubclass(sub, errors.ServerError)
    for status, cls in (
        (400, errors.InvalidRequestError),
        (401, errors.AuthError),
        (404, errors.NotFoundError),
        (409, errors.ConflictError),
        (413, errors.InvalidRequestError),
        (422, errors.InvalidRequestError),
        (500, errors.ServerError),
        (504, errors.RoundTimeoutError),
        (507, errors.CapacityError),
    ):
        e = errors.error_for_status(status, "why", "GET", "/x")
        assert type(e) is cls
        assert (e.status, e.detail) == (status, "why")
        assert "why" in str(e)


def test_importing_the_client_pulls_in_no_server_or_gpu_code() -> None:
    code = (
        "import sys, client, client.http, client.optimizer, client.errors\n"
        "heavy = {'fastapi', 'uvicorn', 'starlette', 'cupy', 'service', 'kernels', 'torch'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
