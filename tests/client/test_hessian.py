"""``update_hessian`` (Sophia) over local://, http:// and shm://: bad input is a clear error
and changes nothing. (Bit-identical results across the transports: test_parity / test_shm.)"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
from stepd.client import InvalidRequestError
from stepd.client.transport import UpdateHessian

from tests.support.clients import connect_shared
from tests.support.server import ShmServer
from tests.support.state import assert_same_state

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
SOPHIA = {"lr": 1e-2, "betas": (0.9, 0.5), "rho": 1.0}


@pytest.fixture(scope="module")
def srv() -> Iterator[ShmServer]:
    with ShmServer() as s:
        yield s


def urls(srv: ShmServer) -> dict[str, str]:
    return {"local": "local://?backend=cpu", "http": srv.url, "shm": srv.shm_url}


def primed(url: str, algorithm: str, name: str, **hp):
    """An optimizer that has stepped ``name`` (shape (2, 3)) once; returns it and the param."""
    opt = connect_shared(url, algorithm, **hp)
    p = np.arange(6, dtype=np.float32).reshape(2, 3)
    opt.step(name, (2, 3), p, np.ones((2, 3), np.float32))
    return opt, p


H = np.ones((2, 3), np.float32)
BAD = [
    ("wrong size", (2, 3), np.ones(5, np.float32), ValueError, "5 elements"),
    ("other shape", (3, 2), np.ones((3, 2), np.float32), ValueError, "differs from"),
    ("NaN", (2, 3), np.array([[1, np.nan, 1], [1, 1, 1]], np.float32), ValueError, "non-finite"),
    ("inf", (2, 3), np.full((2, 3), np.inf, np.float32), ValueError, "non-finite"),
    ("float64", (2, 3), np.ones((2, 3)), TypeError, "float32"),
    ("strided", (2, 3), np.ones((2, 6), np.float32)[:, ::2], ValueError, "C-contiguous"),
    ("a list", (2, 3), [[1.0] * 3] * 2, TypeError, "numpy.ndarray"),
]


@pytest.mark.parametrize("kind", ["local", "http", "shm"])
def test_bad_hessians_are_refused_before_anything_is_sent(srv, kind) -> None:
    name = f"hb.{kind}"
    opt, p = primed(urls(srv)[kind], "sophia", name, **SOPHIA)
    with opt:
        before, p0 = opt.state_dict(), p.copy()
        for what, shape, h, error, match in BAD:
            with pytest.raises(error, match=match):
                opt.update_hessian(name, shape, h)
            assert_same_state(opt.state_dict(), before)
            np.testing.assert_array_equal(p, p0, err_msg=what)
        with pytest.raises(ValueError, match="not registered: call register"):
            opt.update_hessian(f"{name}.new", (2, 3), H)
        assert_same_state(opt.state_dict(), before)
        opt.update_hessian(name, (2, 3), H)  # and a good one goes through
        after = opt.state_dict()["state"][name]["slots"]["hessian"]
        np.testing.assert_array_equal(after, np.full((2, 3), 0.5, np.float32))  # (1 - b2) * H


@pytest.mark.parametrize("kind", ["local", "http", "shm"])
def test_algorithms_without_a_hessian_refuse_it(srv, kind) -> None:
    error = InvalidRequestError  # local:// answers as a server would
    name = f"hn.{kind}"
    opt, _ = primed(urls(srv)[kind], "adamw", name, lr=1e-2)
    with opt:
        before = opt.state_dict()
        with pytest.raises(error, match="does not take a Hessian"):
            opt.update_hessian(name, (2, 3), H)
        assert_same_state(opt.state_dict(), before)


@pytest.mark.parametrize("kind", ["http", "shm"])
def test_the_server_checks_what_reaches_it(srv, kind) -> None:
    """Past the client's checks (the op sent directly), the server still refuses a
    non-finite estimate: InvalidRequestError, nothing changed."""
    name = f"hs.{kind}"
    opt, _ = primed(urls(srv)[kind], "sophia", name, **SOPHIA)
    with opt:
        before = opt.state_dict()
        bad = np.full((2, 3), np.nan, np.float32)
        with pytest.raises(InvalidRequestError, match="non-finite"):
            opt.session.handle(UpdateHessian(name, (2, 3), bad))
        assert_same_state(opt.state_dict(), before)


@pytest.mark.parametrize("kind", ["http", "shm"])
def test_an_unregistered_name_is_refused_by_the_session(srv, kind) -> None:
    with (
        connect_shared(urls(srv)[kind], "sophia", **SOPHIA) as opt,
        pytest.raises(ValueError, match="not registered in this session"),
    ):
        opt.session.handle(UpdateHessian("hs.none", (2, 3), H))
