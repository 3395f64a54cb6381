"""local://, http:// and shm:// (a real server process) give bit-identical results for the
same calls, for every algorithm: params after every iteration and the optimizer state.

The sequence mixes step_batch and single steps, lr and lr_scale changes before and after
the names exist; Sophia also gets a Hessian estimate (``update_hessian``) every
``HESSIAN_EVERY`` iterations. Each remote leg runs in an anonymous run of its own, so it
starts at step 0 like the in-process optimizer.
"""

from __future__ import annotations

import numpy as np
import pytest
from stepd.client import connect
from stepd.kernels.algorithms import ALGORITHMS

from tests.support.state import assert_same_state

SHAPES = {"w": (4, 6), "b": (6,), "m": (3, 3)}

FAMILIES = {
    "sgd": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    "adam": {"lr": 1e-2},
    "adamw": {"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 0.1},
    "nadamw": {"lr": 1e-2},
    "radam": {"lr": 1e-2},
    "qhadamw": {"lr": 1e-2},
    "lion": {"lr": 1e-3, "weight_decay": 0.1},
    "lamb": {"lr": 1e-2, "weight_decay": 0.01},
    "adafactor": {"beta1": 0.9},
    "muon": {"lr": 0.02},
    "soap": {"lr": 1e-2},
    "kron": {"lr": 1e-2},
    "mars": {"lr": 1e-2},
    # beta2 and rho chosen so the Hessian matters (the step is not all clipped sign descent)
    "sophia": {"lr": 1e-2, "betas": (0.9, 0.5), "rho": 1.0, "weight_decay": 0.01},
    "adamw8bit": {"lr": 1e-2, "betas": (0.8, 0.99), "weight_decay": 0.1},
    "lion8bit": {"lr": 1e-3, "weight_decay": 0.1},
    "sgd8bit": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
}
HESSIAN_EVERY = 3


def run(opt, algorithm: str, lr: float | None, step0: int) -> list[dict]:
    """One fixed sequence of calls; returns every parameter after every iteration."""
    rng = np.random.default_rng(7)
    shapes = {f"{algorithm}.{n}": s for n, s in SHAPES.items()}
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    opt.set_lr_scale(f"{algorithm}.m", 0.25)  # before the name exists anywhere
    if lr is not None:
        opt.set_lr(lr * 0.8)  # before the group exists on the server
    history = []
    for t in range(20):
        grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        if algorithm == "sophia" and t % HESSIAN_EVERY == 1:  # names exist after t = 0
            for n, s in shapes.items():
                h = np.abs(rng.standard_normal(s)).astype(np.float32) + np.float32(0.1)
                opt.update_hessian(n, s, h)
        if t % 2 == 0:
            opt.step_batch([(n, shapes[n], params[n], grads[n]) for n in shapes])
        else:
            for n in shapes:
                opt.step(n, shapes[n], params[n], grads[n])
        assert opt.end_iteration() == step0 + t + 1
        if t == 3:
            opt.set_lr_scale(f"{algorithm}.b", 0.5)
            assert opt.lr_scale(f"{algorithm}.b") == 0.5
        if t == 9 and lr is not None:
            opt.set_lr(lr * 0.3)
        history.append({n: p.copy() for n, p in params.items()})
    return history


def test_every_algorithm_has_a_family() -> None:
    assert set(FAMILIES) == set(ALGORITHMS)


@pytest.fixture(scope="module")
def reference() -> dict[str, tuple[list[dict], dict]]:
    """local://'s run of each family, computed once for both remote legs."""
    out = {}
    for algorithm, hp in FAMILIES.items():
        with connect("local://?backend=cpu", algorithm, **hp) as local:
            out[algorithm] = (run(local, algorithm, hp.get("lr"), 0), local.state_dict())
    return out


@pytest.mark.parametrize("kind", ["http", "shm"])
@pytest.mark.parametrize("algorithm", sorted(FAMILIES))
def test_remote_is_bit_identical_to_local(shm_server, reference, kind, algorithm) -> None:
    hp = FAMILIES[algorithm]
    url = shm_server.url if kind == "http" else shm_server.shm_url
    want, want_sd = reference[algorithm]
    with connect(url, algorithm, **hp) as remote:  # an anonymous run: step 0, nothing shared
        got = run(remote, algorithm, hp.get("lr"), 0)
        got_sd = remote.state_dict()
    for t, (a, b) in enumerate(zip(want, got, strict=True)):
        for n in a:
            np.testing.assert_array_equal(b[n], a[n], err_msg=f"{kind} {n} iteration {t}")
    w = f"{algorithm}.w"
    assert not np.array_equal(want[-1][w], want[0][w])  # it did move
    assert_same_state(want_sd, got_sd)
    assert got_sd["lr_scales"] == {f"{algorithm}.b": 0.5, f"{algorithm}.m": 0.25}
