"""``load_state_dict`` over http:// and shm://: a remote optimizer that loaded a state dict
continues exactly like a local:// one that loaded the same dict (params bit for bit), before
any registration (the state waits for each name's registration) and mid-run (names already
registered: uploaded at once). The oracle is the local:// path. Bad input: a clear error and
the server's state unchanged."""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Iterator

import numpy as np
import pytest
from stepd.client import ConflictError, InvalidRequestError, NotFoundError, connect
from stepd.client.state import StateLoad

from tests.support.clients import connect_shared
from tests.support.server import ShmServer
from tests.support.state import assert_same_state

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")

SHAPES = {"w": (4, 6), "b": (6,), "m": (3, 5)}
FAMILIES = {  # elementwise with one and two slots; factored slots of other shapes
    "adamw": {"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 0.1},
    "sgd": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    "adafactor": {"beta1": 0.9},
}
LOCAL = "local://?backend=cpu"


def url_of(srv: ShmServer, transport: str) -> str:
    return srv.shm_url if transport == "shm" else srv.url


def grads(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def iterate(opt, params: dict[str, np.ndarray], seed: int) -> None:
    """One iteration: ``w`` alone (a single step), then the rest as one batch."""
    g = grads(seed)
    opt.step("w", SHAPES["w"], params["w"], g["w"])
    opt.step_batch([(n, SHAPES[n], params[n], g[n]) for n in ("b", "m")])
    opt.end_iteration()


def assert_same_params(a: dict, b: dict, what: str) -> None:
    for n in a:
        np.testing.assert_array_equal(b[n], a[n], err_msg=f"{what}: {n}")


@pytest.fixture
def srv() -> Iterator[ShmServer]:
    """A fresh server (global step 0, no groups): the loaded step must be the one in force."""
    with ShmServer() as s:
        yield s


@pytest.mark.parametrize("transport", ["http", "shm"])
@pytest.mark.parametrize("algorithm", sorted(FAMILIES))
def test_a_loaded_remote_continues_like_local(srv, transport, algorithm) -> None:
    hp = FAMILIES[algorithm]
    rng = np.random.default_rng(1)
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    start = {n: p.copy() for n, p in params.items()}
    with (
        connect(LOCAL, algorithm, **hp) as local,
        connect_shared(url_of(srv, transport), algorithm, **hp) as remote,
    ):
        local.set_lr(local.lr * 0.7)
        local.set_lr_scale("b", 0.5)
        local.set_lr_scale("m", 1.0)  # explicit 1.0: kept in the dict
        for t in range(3):
            iterate(local, params, t)
        sd = local.state_dict()
        assert sd["global_step"] == 3
        assert set(sd["state"]) == set(SHAPES)

        # 1. A fresh remote optimizer loads before any step: everything is pending.
        remote.load_state_dict(sd)
        assert_same_state(remote.state_dict(), sd)  # the round trip, before any upload
        assert remote.lr_scale("b") == 0.5
        assert remote.lr == sd["lr"]
        mine = {n: p.copy() for n, p in params.items()}  # values are not optimizer state
        for t in range(3, 6):
            iterate(local, params, t)
            iterate(remote, mine, t)
            assert_same_params(params, mine, f"{transport} {algorithm} iteration {t}")
        assert_same_state(remote.state_dict(), local.state_dict())
        assert remote.lr_scale("b") == 0.5
        assert remote.lr == pytest.approx(sd["lr"])

        # 2. Mid-run, every name registered: uploaded at once. "m" is left out of the dict,
        #    so its state starts afresh, as in process; lr_scales absent are 1 again.
        mid = copy.deepcopy(sd)
        del mid["state"]["m"]
        mid["lr_scales"] = {"w": 0.25}
        mid["lr"] = sd["lr"] * 0.5
        local.load_state_dict(mid)
        remote.load_state_dict(mid)
        got = remote.state_dict()
        assert_same_state(got, mid)
        assert_same_state(got, local.state_dict())
        assert remote.lr_scale("b") == 1.0
        assert remote.lr_scale("w") == 0.25
        for t in range(6, 9):
            iterate(local, params, t)
            iterate(remote, mine, t)
            assert_same_params(params, mine, f"{transport} {algorithm} mid-run iteration {t}")
        assert_same_state(remote.state_dict(), local.state_dict())
        assert not any(np.array_equal(params[n], start[n]) for n in SHAPES)  # they moved


@pytest.mark.parametrize("transport", ["http", "shm"])
def test_pending_state_is_uploaded_when_its_name_registers(srv, transport) -> None:
    """A dict naming parameters this client has not registered yet, loaded mid-run: the
    registered names go now, the others right after their registration, before their first
    step; end_iteration before the first upload moves the loaded step on, as in process."""
    hp = FAMILIES["adamw"]
    params = {n: np.full(s, 0.5, np.float32) for n, s in SHAPES.items()}
    with connect(LOCAL, "adamw", **hp) as local:
        for t in range(2):
            iterate(local, params, t)
        sd = local.state_dict()
    with (
        connect(LOCAL, "adamw", **hp) as local,
        connect_shared(url_of(srv, transport), "adamw", **hp) as remote,
    ):
        local.load_state_dict(sd)
        remote.load_state_dict(sd)
        assert remote.end_iteration() == local.end_iteration() == 3  # before any upload
        mine = {n: p.copy() for n, p in params.items()}
        g = grads(10)
        for opt, ps in ((local, params), (remote, mine)):
            opt.step("b", SHAPES["b"], ps["b"], g["b"])  # "b" registers: first upload
        assert_same_state(remote.state_dict(), local.state_dict())  # "w", "m" still pending
        for t in range(11, 13):
            iterate(local, params, t)
            iterate(remote, mine, t)
            assert_same_params(params, mine, f"{transport} iteration {t}")
        assert_same_state(remote.state_dict(), local.state_dict())


@pytest.mark.parametrize("transport", ["http", "shm"])
def test_bad_state_is_refused_and_changes_nothing(srv, transport) -> None:
    hp = FAMILIES["adamw"]
    params = {n: np.ones(s, np.float32) for n, s in SHAPES.items()}
    with connect_shared(url_of(srv, transport), "adamw", **hp) as opt:
        for t in range(2):
            iterate(opt, params, t)
        good = opt.state_dict()
        before = opt.state_dict()

        def refused(exc: type[Exception], match: str, sd: dict) -> None:
            with pytest.raises(exc, match=match):
                opt.load_state_dict(sd)
            assert_same_state(opt.state_dict(), before)
            assert opt.lr_scale("w") == before["lr_scales"].get("w", 1.0)

        refused(ValueError, "algorithm 'lion'", {**good, "algorithm": "lion"})
        bad = copy.deepcopy(good)
        bad["state"]["w"]["slots"]["exp_avg"] = np.zeros((6, 4), np.float32)
        refused(InvalidRequestError, r"'w': slot 'exp_avg' must be float32 \(4, 6\)", bad)
        bad = copy.deepcopy(good)
        bad["state"]["b"]["slots"]["exp_avg_sq"] = bad["state"]["b"]["slots"]["exp_avg_sq"].astype(
            np.float64
        )
        refused(TypeError, "float32", bad)
        bad = copy.deepcopy(good)
        bad["state"]["w"]["shape"] = [6, 4]
        refused(ConflictError, r"registered with shape \[4, 6\]", bad)
        refused(
            ConflictError,
            "hyperparams",
            {**good, "hyperparams": {**good["hyperparams"], "eps": 1e-3}},
        )
        refused(ValueError, "global_step must be >= 0", {**good, "global_step": -1})
        refused(ValueError, "cannot hold '/'", {**good, "lr_scales": {"a/b": 1.0}})

        # A parameter this server does not know: the client keeps it pending, so it is sent
        # here as the client would send it once registered; the server refuses it whole.
        ghost = copy.deepcopy(good)
        ghost["state"]["ghost"] = copy.deepcopy(good["state"]["w"])
        body, _ = StateLoad(ghost, "adamw").next_upload(["w", "ghost"])
        send = functools.partial(opt.transport.load_state, opt.session.group_id, body)
        with pytest.raises(NotFoundError, match="'ghost' is not registered"):
            send()
        assert_same_state(opt.state_dict(), before)


def test_a_state_larger_than_a_control_message_loads_over_shm(srv) -> None:
    """LOAD_STATE may exceed the 64 MiB of other control messages (up to the body limit)."""
    n = 17 << 20  # SGD momentum: one 68 MiB slot
    rng = np.random.default_rng(0)
    g = rng.standard_normal(n, dtype=np.float32)
    with connect(LOCAL, "sgd", lr=0.1, momentum=0.9) as local:
        p = np.zeros(n, np.float32)
        local.step("huge", (n,), p, g)
        sd = local.state_dict()
    with connect_shared(srv.shm_url, "sgd", lr=0.1, momentum=0.9) as remote:
        q = np.zeros(n, np.float32)
        remote.load_state_dict(sd)
        remote.step("huge", (n,), q, g)  # registers, uploads the 68 MiB state, then steps
        p[...] = 0.0
        with connect(LOCAL, "sgd", lr=0.1, momentum=0.9) as oracle:
            oracle.load_state_dict(sd)
            oracle.step("huge", (n,), p, g)
        np.testing.assert_array_equal(q, p)
