"""The client contract: every operation of the optimizer trait, and every error, gives the same
result and the same exception over local://, http:// and shm://.

One script of calls runs on each transport (a fresh anonymous run on the server, so every
leg starts at step 0); each call's outcome is recorded — its value (arrays bit for bit), or
its exception's type and message (a server's refusal: its status and detail) — and the
records must be equal. Whatever the script asks, a rule lives in one place: the session for
http:// and shm://, the numeric core (answering as the server would) for local://.

The server legs run twice: on a CPU store, and on a CUDA store over the CuPy stand-in
(tests/support/fakecupy: the host/device handling of the CUDA path, NOT a GPU run), whose
results must equal the in-process CPU ones bit for bit as well.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from stepd.client import ServerError, connect

from tests.support import fakecuda
from tests.support.server import ShmServer

TRANSPORTS = ["local", "http", "shm"]


def _url(kind: str, server: Any) -> str:
    return {"local": "local://?backend=cpu", "http": server.url, "shm": server.shm_url}[kind]


def _outcome(call: Callable[[], Any]) -> tuple:
    """A comparable record of what ``call()`` did."""
    try:
        value = call()
    except ServerError as exc:
        return ("raised", type(exc).__name__, exc.status, str(exc.detail))
    except (TypeError, ValueError) as exc:
        return ("raised", type(exc).__name__, str(exc))
    return ("returned", _plain(value))


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def f32(*shape: int, fill: float | None = None, seed: int = 0) -> np.ndarray:
    if fill is not None:
        return np.full(shape, fill, np.float32)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def script(url: str, algorithm: str, hp: dict[str, Any]) -> list[tuple[str, tuple]]:
    """Every call of the trait, and the ways each can fail; the record of each."""
    log: list[tuple[str, tuple]] = []
    with connect(url, algorithm, **hp) as opt:
        w, b = f32(2, 3, seed=1), f32(3, seed=2)

        def rec(what: str, call: Callable[[], Any]) -> None:
            log.append((what, _outcome(call)))

        def params() -> dict[str, np.ndarray]:
            return {"w": w.copy(), "b": b.copy()}

        rec("lr before any step", lambda: opt.lr)
        rec("lr_scale of a name never seen", lambda: opt.lr_scale("never.seen"))
        rec("set_lr_scale before the name exists", lambda: opt.set_lr_scale("b", 0.5))
        rec("lr_scale pending", lambda: opt.lr_scale("b"))
        rec("set_lr before the group exists", lambda: opt.set_lr(hp["lr"] * 0.5))
        rec("lr pending", lambda: opt.lr)
        rec("step", lambda: opt.step("w", (2, 3), w, f32(2, 3, seed=3)))
        rec("params after step", params)
        rec(
            "step_batch",
            lambda: opt.step_batch(
                [("w", (2, 3), w, f32(2, 3, seed=4)), ("b", (3,), b, f32(3, seed=5))]
            ),
        )
        rec("params after step_batch", params)
        rec("end_iteration", opt.end_iteration)
        rec("lr_scale registered", lambda: opt.lr_scale("b"))
        rec("set_lr", lambda: opt.set_lr(hp["lr"] * 0.25))
        rec("lr", lambda: opt.lr)
        rec("step after set_lr", lambda: opt.step("b", (3,), b, f32(3, seed=6)))
        rec("params after set_lr", params)
        rec("set_hyperparams", lambda: opt.set_hyperparams(betas=(0.8, 0.99), weight_decay=0.1))
        rec("step after set_hyperparams", lambda: opt.step("w", (2, 3), w, f32(2, 3, seed=9)))
        rec("params after set_hyperparams", params)
        rec("state_dict", opt.state_dict)

        # -- refusals: each leaves everything as it was
        rec("name with a slash", lambda: opt.step("a/b", (3,), f32(3), f32(3)))
        rec("empty name", lambda: opt.step("", (3,), f32(3), f32(3)))
        rec("shape differs from the registered one", lambda: opt.step("w", (3, 2), w, f32(3, 2)))
        rec("float64 gradient", lambda: opt.step("w", (2, 3), w, np.ones((2, 3))))
        rec("gradient of the wrong size", lambda: opt.step("w", (2, 3), w, f32(7)))
        readonly = np.frombuffer(bytes(8), np.float32)
        rec("read-only param", lambda: opt.step("ro", (2,), readonly, f32(2)))
        rec("NaN gradient", lambda: opt.step("w", (2, 3), w, f32(2, 3, fill=np.nan)))
        rec(
            "Inf in a batch",
            lambda: opt.step_batch(
                [("w", (2, 3), w, f32(2, 3)), ("b", (3,), b, f32(3, fill=np.inf))]
            ),
        )
        rec("NaN first value", lambda: opt.step("nanv", (2,), f32(2, fill=np.nan), f32(2)))
        rec(
            "name twice in a batch",
            lambda: opt.step_batch([("w", (2, 3), w, f32(2, 3)), ("w", (2, 3), w, f32(2, 3))]),
        )
        rec("Hessian, algorithm without", lambda: opt.update_hessian("w", (2, 3), f32(2, 3)))
        rec("Hessian of an unknown name", lambda: opt.update_hessian("nope", (2,), f32(2)))
        rec("negative lr", lambda: opt.set_lr(-1.0))
        rec("set_hyperparams of the lr", lambda: opt.set_hyperparams(lr=0.5))
        rec("set_hyperparams beta 1.5", lambda: opt.set_hyperparams(betas=(1.5, 0.9)))
        rec("set_hyperparams unknown", lambda: opt.set_hyperparams(momentum=0.9))
        rec("set_hyperparams of the layout", lambda: opt.set_hyperparams(amsgrad=True))
        rec("NaN lr_scale", lambda: opt.set_lr_scale("w", float("nan")))
        rec("lr_scale of a non-string", lambda: opt.lr_scale(3))  # type: ignore[arg-type]
        rec("state of another algorithm", lambda: opt.load_state_dict({"algorithm": "sgd"}))
        rec("state not a mapping", lambda: opt.load_state_dict([1, 2]))  # type: ignore[arg-type]
        rec("params after the refusals", params)
        rec("state after the refusals", opt.state_dict)

        # -- a state_dict round trip continues bit for bit
        saved = opt.state_dict()
        rec("step after saving", lambda: opt.step("w", (2, 3), w, f32(2, 3, seed=7)))
        rec("load_state_dict", lambda: opt.load_state_dict(saved))
        rec("state after loading", opt.state_dict)
        rec("end_iteration after loading", opt.end_iteration)
        rec("step after loading", lambda: opt.step("w", (2, 3), w, f32(2, 3, seed=8)))
        rec("params at the end", params)
        rec("state at the end", opt.state_dict)
    return log


@pytest.fixture(scope="module")
def records(shm_server) -> dict[str, list[tuple[str, tuple]]]:
    hp = {"lr": 1e-2, "weight_decay": 0.01}
    return {kind: script(_url(kind, shm_server), "adamw", hp) for kind in TRANSPORTS}


@pytest.fixture(scope="module")
def cuda_records(records) -> dict[str, list[tuple[str, tuple]]]:
    """The server legs again, on a CUDA store over the stand-in."""
    reason = fakecuda.nvrtc_missing()
    if reason is not None:
        pytest.skip(reason)
    hp = {"lr": 1e-2, "weight_decay": 0.01}
    with ShmServer(device="cuda", **fakecuda.server_env()) as srv:
        return {kind: script(_url(kind, srv), "adamw", hp) for kind in ("http", "shm")}


@pytest.mark.parametrize("kind", ["http", "shm"])
def test_every_call_and_every_error_is_the_same_as_in_process(records, kind) -> None:
    want, got = records["local"], records[kind]
    assert [what for what, _ in got] == [what for what, _ in want]
    for (what, a), (_, b) in zip(want, got, strict=True):
        assert b == a, f"{kind}: {what}"


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["http", "shm"])
def test_a_cuda_store_answers_every_call_as_in_process(records, cuda_records, kind) -> None:
    want, got = records["local"], cuda_records[kind]
    assert [what for what, _ in got] == [what for what, _ in want]
    for (what, a), (_, b) in zip(want, got, strict=True):
        assert b == a, f"{kind} on a CUDA store: {what}"


def test_the_script_exercises_refusals_and_moves(records) -> None:
    """The comparison above is only worth something if the script fails and succeeds."""
    outcomes = dict(records["local"])
    assert outcomes["NaN gradient"][0] == "raised"
    assert outcomes["Hessian, algorithm without"][1] == "InvalidRequestError"
    assert outcomes["shape differs from the registered one"][1] == "ValueError"
    assert outcomes["lr_scale of a name never seen"] == ("returned", 1.0)
    assert outcomes["end_iteration"] == ("returned", 1)
    assert outcomes["params after step"] != outcomes["params at the end"]


@pytest.mark.parametrize("kind", TRANSPORTS)
def test_connect_refuses_a_bad_group_the_same_way(shm_server, kind) -> None:
    url = _url(kind, shm_server)
    got = [
        _outcome(lambda: connect(url, "nope")),
        _outcome(lambda: connect(url, "adamw", betas=(1.5, 0.9))),
        _outcome(lambda: connect(url, "sgd", lr=-1.0)),
        _outcome(lambda: connect(url, "adamw", nonsense=1)),
    ]
    want = [
        _outcome(lambda: connect("local://", "nope")),
        _outcome(lambda: connect("local://", "adamw", betas=(1.5, 0.9))),
        _outcome(lambda: connect("local://", "sgd", lr=-1.0)),
        _outcome(lambda: connect("local://", "adamw", nonsense=1)),
    ]
    assert got == want
    assert all(o[1] == "InvalidRequestError" for o in got), got
