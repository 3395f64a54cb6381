"""Bad arguments raise in the client before anything is sent, and change nothing."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from stepd.client import InvalidRequestError, StepdOptimizer, TransportError, connect

from tests.support.clients import connect_shared
from tests.support.state import Spy


@pytest.fixture(params=["local", "http"])
def spied(request, shared_server):
    url = "local://?backend=cpu" if request.param == "local" else shared_server.url
    opt = connect_shared(url, "adamw", lr=1e-2)
    spy = Spy(opt.session)
    yield StepdOptimizer(spy), spy, request.param, shared_server.url
    spy.close()


def ok(n: int = 6) -> np.ndarray:
    return np.arange(n, dtype=np.float32)


def bad_cases():
    ro = ok()
    ro.flags.writeable = False
    return {
        "float64 param": (("bad.a", (6,), ok().astype(np.float64), ok()), TypeError, "float32"),
        "list grad": (("bad.a", (6,), ok(), list(range(6))), TypeError, "numpy.ndarray"),
        "big-endian": (("bad.a", (6,), ok().astype(">f4"), ok()), TypeError, "float32"),
        "strided": (("bad.a", (3,), ok()[::2], ok(3)), ValueError, "C-contiguous"),
        "read-only": (("bad.a", (6,), ro, ok()), ValueError, "writable"),
        "grad size": (("bad.a", (6,), ok(), ok(5)), ValueError, "grad has 5 elements"),
        "shape size": (("bad.a", (2, 2), ok(), ok()), ValueError, "shape \\[2, 2\\] needs 4"),
        "negative dim": (("bad.a", (-6,), ok(), ok()), ValueError, "non-negative"),
        "empty name": (("", (6,), ok(), ok()), TypeError, "non-empty str"),
        "not a shape": (("bad.a", 6, ok(), ok()), TypeError, "sequence of ints"),
    }


@pytest.mark.parametrize("case", sorted(bad_cases()))
def test_bad_step_sends_nothing_and_changes_nothing(spied, case) -> None:
    opt, spy, _, _ = spied
    item, exc, match = bad_cases()[case]
    good = ok(4)
    before_good = good.copy()
    before = np.array(item[2], copy=True)
    with pytest.raises(exc, match=match):
        opt.step(*item)
    with pytest.raises(exc, match=match):  # one bad item spoils the whole batch
        opt.step_batch([("bad.good", (4,), good, ok(4)), item])
    assert spy.ops == []
    np.testing.assert_array_equal(good, before_good)
    np.testing.assert_array_equal(item[2], before)


def test_other_bad_calls_send_nothing(spied) -> None:
    opt, spy, kind, url = spied
    p = ok()
    with pytest.raises(ValueError, match="more than once"):
        opt.step_batch([("bad.d", (6,), p, ok()), ("bad.d", (6,), p, ok())])
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="learning rate"):
            opt.set_lr(bad)
        with pytest.raises(ValueError, match="lr_scale"):
            opt.set_lr_scale("bad.d", bad)
    with pytest.raises(TypeError):
        opt.set_lr("0.1")
    with pytest.raises(TypeError, match="non-empty str"):
        opt.lr_scale(3)
    assert spy.ops == []
    if kind == "http":  # and the server never heard of these names
        names = {p["name"] for p in httpx.get(f"{url}/v1/runs/t/params").json()}
        assert not any(n.startswith("bad.") for n in names)


def test_a_name_keeps_its_shape(spied) -> None:
    opt, spy, _, _ = spied
    p = ok()
    opt.step("shape.s", (2, 3), p, ok())
    n_ops = len(spy.ops)
    before = p.copy()
    with pytest.raises(ValueError, match="differs from its registered"):
        opt.step("shape.s", (3, 2), p, ok())
    assert len(spy.ops) == n_ops
    np.testing.assert_array_equal(p, before)


def test_bad_urls() -> None:
    with pytest.raises(ValueError, match="unsupported URL"):
        connect_shared("ftp://x")
    with pytest.raises(ValueError, match="local://"):
        connect("local://?flavour=x")
    with pytest.raises(TransportError, match="shm://"):  # no server listens there
        connect_shared("shm:///nonexistent/stepd.sock")
    with pytest.raises(ValueError, match="socket path"):
        connect_shared("shm://host/x.sock")
    with pytest.raises(InvalidRequestError, match="unknown algorithm"):  # as a server says it
        connect("local://", "nope")
