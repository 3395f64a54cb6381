"""Sophia-H: parity with pytorch-optimizer's SophiaH given the same Hessian estimates, the
fused op against the NumPy reference, resume, update_hessian's contract and validation.

The parity table (oracles/) has no place for a Hessian estimate, hence this module. SophiaH
estimates the Hessian itself (Hutchinson, through autograd) unless ``step(hessian=[...])``
is given one, which it stores as ``state['hessian']`` and folds in with
``lerp(hessian_moment, hessian, 1 - beta2)`` — the same fold ``update_hessian`` does. It
estimates at steps 1, 1 + k, 1 + 2k, ... (``update_period = k``), so we supply the same
estimate to both exactly at those steps.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import pytorch_optimizer as po
import torch
from stepd.kernels import create_optimizer

from .gpu import cuda_or_skip

SHAPES = ((), (1,), (37,), (16, 9), (3, 5, 7))


def _estimate(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A Hutchinson-like estimate: mostly positive over decades, some entries negative."""
    scale = np.exp(rng.uniform(-3.0, 4.0, size=shape))
    return np.asarray(scale * (rng.standard_normal(shape) + 1.0), dtype=np.float32)


# Sophia's oracle parity cases (test_registry.py counts them with the oracles/ table):
# id -> (hparams, SophiaH's update_period, lr_scale of the first two parameters).
PARITY_CASES: dict[str, tuple[dict, int, float]] = {
    "wd-period-10": ({"lr": 0.05, "betas": (0.9, 0.95), "rho": 0.05, "weight_decay": 0.1}, 10, 1.0),
    "defaults-period-3-lr-scale": ({"lr": 0.02, "rho": 0.04, "eps": 1e-4}, 3, 0.5),
}


@pytest.mark.parametrize(
    ("hparams", "period", "lr_scale"), list(PARITY_CASES.values()), ids=list(PARITY_CASES)
)
def test_matches_sophiah_every_step(hparams: dict, period: int, lr_scale: float) -> None:
    rng = np.random.default_rng(period)
    ours = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in SHAPES]
    theirs = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in ours]
    names = [f"p{i}" for i in range(len(ours))]
    opt = create_optimizer("sophia", backend="cpu", **hparams)
    kwargs = dict(hparams)
    betas = kwargs.pop("betas", (0.96, 0.99))
    rho = kwargs.pop("rho")
    lr = kwargs.pop("lr")
    # lr_scale(name) multiplies the lr inside the step: SophiaH sees it as a group's lr.
    oracle = po.SophiaH(
        [{"params": theirs[:2], "lr": lr * lr_scale}, {"params": theirs[2:]}],
        lr=lr,
        betas=betas,
        p=rho,
        update_period=period,
        **kwargs,
    )
    for name in names[:2]:
        opt.set_lr_scale(name, lr_scale)
    clipped = unclipped = 0
    for step in range(60):
        grads = [np.asarray(rng.standard_normal(p.shape), dtype=np.float32) for p in ours]
        for t, g in zip(theirs, grads, strict=True):
            t.grad = torch.from_numpy(g.copy())
        hessian = None
        if step % period == 0:
            hessian = [_estimate(rng, p.shape) for p in ours]
            for name, p, h in zip(names, ours, hessian, strict=True):
                opt.update_hessian(name, p.shape, h)
            hessian = [torch.from_numpy(h.copy()) for h in hessian]
        before = [p.copy() for p in ours]
        oracle.step(hessian=hessian)
        opt.step_batch(list(zip(names, [p.shape for p in ours], ours, grads, strict=True)))
        opt.end_iteration()
        for name, p, t, b in zip(names, ours, theirs, before, strict=True):
            np.testing.assert_allclose(
                p,
                t.detach().numpy(),
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{name} diverged at step {step + 1}",
            )
            # torch's lerp may fuse the multiply-add, ours rounds twice: entries of h that
            # cancel to ~0 differ in relative terms, hence the atol.
            np.testing.assert_allclose(
                opt.state(name).slots["hessian"],
                oracle.state[t]["hessian_moment"].numpy(),
                rtol=1e-5,
                atol=1e-6,
            )
            # Both branches of the clip take part (|step| = lr rho when clipped).
            lr_eff = opt.lr * opt.lr_scale(name)
            move = np.abs(p - b * (1 - lr_eff * hparams.get("weight_decay", 0.0)))
            cap = lr_eff * rho
            clipped += int(np.isclose(move, cap, rtol=1e-3).sum())
            unclipped += int((move < 0.9 * cap).sum())
    assert clipped > 100
    assert unclipped > 100


def _run(backend: str, steps: int, sizes=(1, 15, 16, 17, 1000, 40_003)) -> dict:
    rng = np.random.default_rng(11)
    opt = create_optimizer("sophia", backend=backend, lr=0.05, rho=0.05, weight_decay=0.1, eps=1e-3)
    params = {f"p{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate(sizes)}
    opt.set_lr_scale("p1", 0.25)
    for step in range(steps):
        if step % 4 == 0:
            for k, p in params.items():
                opt.update_hessian(k, p.shape, _estimate(rng, p.shape))
        grads = {k: rng.standard_normal(p.size).astype(np.float32) for k, p in params.items()}
        opt.step_batch([(k, p.shape, p, grads[k]) for k, p in params.items()])
        opt.end_iteration()
    return {"params": params, "state": opt.state_dict()["state"]}


def test_fused_cpu_equals_reference_bitwise() -> None:
    fused, ref = _run("cpu", 12), _run("reference", 12)
    for name, p in fused["params"].items():
        np.testing.assert_array_equal(p, ref["params"][name], err_msg=name)
        for slot, buf in fused["state"][name]["slots"].items():
            np.testing.assert_array_equal(buf, ref["state"][name]["slots"][slot], err_msg=slot)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_nan_in_hessian_or_momentum_propagates(backend: str) -> None:
    """As torch.clamp: a NaN in h (or the momentum) gives a NaN step, not a silent clip."""
    opt = create_optimizer("sophia", backend=backend, lr=0.1)
    p = np.zeros(4, np.float32)
    opt.update_hessian("w", (4,), np.array([1.0, np.nan, -1.0, 2.0], np.float32))
    opt.step("w", (4,), p, np.array([1.0, 1.0, 1.0, np.nan], np.float32))
    assert np.isnan(p).tolist() == [False, True, False, True]
    # h = 0.01 (unclipped: m / h = 0.04 / 0.01 > rho, clipped to rho); h = -0.01 <= eps.
    np.testing.assert_allclose(p[[0, 2]], [-0.1 * 0.01, -0.1 * 0.01], rtol=1e-6)


def test_update_hessian_folds_into_the_ema() -> None:
    opt = create_optimizer("sophia", betas=(0.9, 0.8))
    h1 = np.array([[1.0, -2.0], [3.0, 4.0]], np.float32)
    h2 = np.array([[0.5, 0.5], [0.5, 8.0]], np.float32)
    opt.update_hessian("w", (2, 2), h1)
    np.testing.assert_allclose(opt.state("w").slots["hessian"], 0.2 * h1, rtol=1e-6)
    opt.update_hessian("w", (2, 2), h2.reshape(-1))  # flat, like a param
    np.testing.assert_allclose(
        opt.state("w").slots["hessian"], 0.8 * 0.2 * h1 + 0.2 * h2, rtol=1e-6
    )
    assert opt.state("w").count == 0  # no step was taken


def test_update_hessian_with_a_wrong_size_raises_and_changes_nothing() -> None:
    opt = create_optimizer("sophia")
    with pytest.raises(ValueError, match=re.escape("has 5 elements, shape (2, 3) needs 6")):
        opt.update_hessian("w", (2, 3), np.ones(5, np.float32))
    assert opt.names() == []  # no state was created
    p = np.ones((2, 3), np.float32)
    opt.update_hessian("w", (2, 3), np.full((2, 3), 2.0, np.float32))
    opt.step("w", (2, 3), p, np.ones((2, 3), np.float32))
    before = {k: v.copy() for k, v in opt.state("w").slots.items()}
    with pytest.raises(ValueError, match="has 7 elements"):
        opt.update_hessian("w", (2, 3), np.ones(7, np.float32))
    with pytest.raises(ValueError, match="differs from its registered"):
        opt.update_hessian("w", (3, 2), np.ones(6, np.float32))
    with pytest.raises(TypeError, match="must be float32"):
        opt.update_hessian("w", (2, 3), np.ones((2, 3), np.float64))
    for k, v in opt.state("w").slots.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_resume_is_bit_identical() -> None:
    rng = np.random.default_rng(12)
    params = {"a": rng.standard_normal((4, 6)).astype(np.float32), "b": np.float32([0.5])}
    steps = []
    for i in range(20):
        grads = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()}
        hess = {k: _estimate(rng, p.shape) for k, p in params.items()} if i % 5 == 0 else None
        steps.append((grads, hess))

    def run(opt, ps, chunk) -> None:
        for grads, hess in chunk:
            for k, h in (hess or {}).items():
                opt.update_hessian(k, ps[k].shape, h)
            opt.step_batch([(k, p.shape, p, grads[k]) for k, p in ps.items()])
            opt.end_iteration()

    hp = {"lr": 0.03, "weight_decay": 0.01}
    straight, p1 = create_optimizer("sophia", **hp), {k: p.copy() for k, p in params.items()}
    run(straight, p1, steps)
    first, p2 = create_optimizer("sophia", **hp), {k: p.copy() for k, p in params.items()}
    run(first, p2, steps[:7])
    resumed = create_optimizer("sophia", **hp)
    resumed.load_state_dict(first.state_dict())
    run(resumed, p2, steps[7:])
    for k in params:
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)


def test_converges_on_an_ill_conditioned_quadratic() -> None:
    """``f = 1/2 sum d_i x_i^2`` with curvatures over six decades; the exact diagonal Hessian
    every 10 steps. Sophia's step ``m / h`` is Newton's per coordinate (clipped), so every
    coordinate converges alike; sign descent (no Hessian given) stalls at ``lr rho``."""
    rng = np.random.default_rng(13)
    d = np.geomspace(1e-3, 1e3, 50).astype(np.float32)
    x0 = rng.standard_normal(50).astype(np.float32)

    def train(with_hessian: bool) -> float:
        opt = create_optimizer("sophia", lr=1.0, rho=0.05, betas=(0.9, 0.99))
        x = x0.copy()
        for step in range(600):
            if with_hessian and step % 10 == 0:
                opt.update_hessian("x", (50,), d)
            opt.step("x", (50,), x, d * x)
            opt.end_iteration()
        return float(np.max(np.abs(x)))

    assert train(with_hessian=True) < 1e-3 * np.abs(x0).max()
    assert train(with_hessian=False) > 1e-2 * np.abs(x0).max()


def test_other_algorithms_refuse_a_hessian() -> None:
    opt = create_optimizer("adamw")
    with pytest.raises(TypeError, match="adamw does not take a Hessian estimate"):
        opt.update_hessian("w", (2,), np.ones(2, np.float32))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "Invalid learning rate: -1.0"),
        ({"betas": (1.2, 0.99)}, "Invalid beta parameter at index 0: 1.2"),
        ({"betas": (0.9, 1.0)}, "Invalid beta parameter at index 1: 1.0"),
        ({"rho": -0.01}, "Invalid rho value: -0.01"),
        ({"rho": float("nan")}, "Invalid rho value: nan"),
        ({"eps": -1e-12}, "Invalid epsilon value: -1e-12"),
        ({"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
    ],
)
def test_invalid_hyperparameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        create_optimizer("sophia", **kwargs)
    assert str(info.value) == message


@pytest.mark.gpu
def test_cuda_equals_reference_bitwise() -> None:
    cp = cuda_or_skip()
    rng = np.random.default_rng(15)
    sizes = (1, 17, 1000, 40_003)
    host = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    dev = [cp.asarray(p) for p in host]
    hp = {"lr": 0.05, "rho": 0.05, "weight_decay": 0.1, "eps": 1e-3}
    ref = create_optimizer("sophia", backend="reference", **hp)
    gpu = create_optimizer("sophia", backend="cuda", **hp)
    for opt in (ref, gpu):
        opt.set_lr_scale("p1", 0.25)
    for step in range(12):
        if step % 4 == 0:
            for i, p in enumerate(host):
                h = _estimate(rng, p.shape)
                ref.update_hessian(f"p{i}", p.shape, h)
                gpu.update_hessian(f"p{i}", p.shape, cp.asarray(h))
        grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
        names = [f"p{i}" for i in range(len(sizes))]
        ref.step_batch([(k, p.shape, p, g) for k, p, g in zip(names, host, grads, strict=True)])
        gpu.step_batch(
            [(k, p.shape, p, cp.asarray(g)) for k, p, g in zip(names, dev, grads, strict=True)]
        )
        ref.end_iteration()
        gpu.end_iteration()
    for i, (a, b) in enumerate(zip(host, dev, strict=True)):
        np.testing.assert_array_equal(cp.asnumpy(b), a, err_msg=f"p{i}")
        for slot, buf in gpu.state(f"p{i}").slots.items():
            np.testing.assert_array_equal(cp.asnumpy(buf), ref.state(f"p{i}").slots[slot])
