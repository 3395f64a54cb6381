"""LAMB beyond the parity table: fused vs reference bit for bit, the trust ratio's special
cases against optax, chunked norms, convergence, resume, and bad hyperparameters."""

from __future__ import annotations

import re

import numpy as np
import pytest
import stepd.kernels.algorithms.lamb as lamb_module
import torch
from stepd.kernels import create_optimizer
from stepd.kernels.algorithms.lamb import LAMB_APPLY, LAMB_MOMENTS
from stepd.kernels.backends import get_backend
from stepd.kernels.ops import Launch

from .gpu import cuda_or_skip
from .oracles.lamb import optax_lamb
from .problems import assert_resume_bit_identical

# Around the vector width (16 floats) and the parallel threshold (32768), plus 0-d and a
# shaped tensor; "zero" starts at 0 (trust ratio 1), "still" never gets a gradient (u = 0).
SHAPES = {"s": (), "a": (1,), "b": (15,), "c": (17,), "d": (40_003,), "w": (8, 9, 5)}
HPARAMS = {"lr": 1e-2, "weight_decay": 0.1}


def _run(backend: str, steps: int, batched: bool = True, seed: int = 7) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    opt = create_optimizer("lamb", backend=backend, **HPARAMS)
    params = {k: np.asarray(rng.standard_normal(s), np.float32) for k, s in SHAPES.items()}
    params["zero"] = np.zeros((3, 4), np.float32)
    params["still"] = np.zeros(6, np.float32)
    opt.set_lr_scale("b", 0.25)  # per-tensor scalars inside one launch
    for _ in range(steps):
        items = []
        for k, p in params.items():
            g = np.zeros_like(p) if k == "still" else rng.standard_normal(p.shape) * 3
            items.append((k, p.shape, p, np.asarray(g, np.float32)))
        if batched:
            opt.step_batch(items)
        else:
            for item in items:
                opt.step(*item)
        opt.end_iteration()
    return params, opt.state_dict()


def test_fused_cpu_equals_reference_bitwise() -> None:
    fused, fused_sd = _run("cpu", steps=12)
    ref, ref_sd = _run("reference", steps=12)
    for name, p in fused.items():
        np.testing.assert_array_equal(p, ref[name], err_msg=name)
        for slot, buf in fused_sd["state"][name]["slots"].items():
            np.testing.assert_array_equal(buf, ref_sd["state"][name]["slots"][slot], err_msg=slot)
    assert not fused["still"].any()  # u = 0: nothing moves
    assert fused["zero"].any()  # ||theta|| = 0: ratio 1, the Adam step moves it


def test_batched_launch_equals_one_call_per_tensor() -> None:
    a, _ = _run("cpu", steps=4, batched=True)
    b, _ = _run("cpu", steps=4, batched=False)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("op", [LAMB_MOMENTS, LAMB_APPLY], ids=lambda op: op.name)
def test_fused_ops_equal_reference_bitwise(op) -> None:
    rng = np.random.default_rng(5)
    n = 40_003
    scalars = {
        "beta1": 0.9,
        "one_minus_beta1": 0.1,
        "beta2": 0.999,
        "one_minus_beta2": 1e-3,
        "bias_correction1": 0.19,
        "bias_correction2": 0.002,
        "eps": 1e-6,
        "weight_decay": 0.1,
        "neg_step": -3e-3,
    }
    args = op.pack(scalars)
    p, g, m = rng.standard_normal((3, n)).astype(np.float32)
    v = np.abs(rng.standard_normal(n)).astype(np.float32)
    out = {}
    for backend in ("cpu", "reference"):
        bufs = [p.copy(), g.copy(), m.copy(), v.copy()]
        get_backend(backend).launch(op, [Launch(bufs[0], bufs[1], bufs[2:], args)])
        out[backend] = bufs
    for x, y in zip(out["cpu"], out["reference"], strict=True):
        np.testing.assert_array_equal(x, y)


def test_direction_used_for_the_norm_is_the_kernels() -> None:
    """The host recomputes u for ||u|| with NumPy; LambApply with neg_step = -1 on p = 0
    gives back -u computed by the C++, so the two must be the same bits (the weight-decay
    term with p != 0 is covered by the whole-op comparison above)."""
    rng = np.random.default_rng(6)
    n = 4099
    m = rng.standard_normal(n).astype(np.float32)
    v = np.abs(rng.standard_normal(n)).astype(np.float32)
    args = LAMB_APPLY.pack(
        {
            "bias_correction1": 0.1,
            "bias_correction2": 1e-3,
            "eps": 1e-6,
            "weight_decay": 0.1,
            "neg_step": -1.0,
        }
    )
    out = np.zeros(n, np.float32)
    u = lamb_module._direction(np, out, m, v, LAMB_APPLY.unpack(args))
    get_backend("cpu").launch(LAMB_APPLY, [Launch(out, np.zeros(n, np.float32), [m, v], args)])
    np.testing.assert_array_equal(out, -u)


def test_chunked_norms_agree_with_one_chunk(monkeypatch) -> None:
    """Tensors larger than the chunk: the float64 sums only change order."""
    one, _ = _run("cpu", steps=3)
    monkeypatch.setattr(lamb_module, "_CHUNK", 1000)
    chunked, _ = _run("cpu", steps=3)
    for name in one:
        np.testing.assert_allclose(chunked[name], one[name], rtol=1e-6, atol=1e-7)


def test_trust_ratio_special_cases_match_optax() -> None:
    """A zero-initialised tensor (||theta|| = 0), one whose gradient is always zero
    (||u|| = 0) and one that starts at zero but later gets gradients: ratio 1 in optax."""
    rng = np.random.default_rng(8)
    ours = {
        "zero": np.zeros((4, 3), np.float32),
        "still": rng.standard_normal(5).astype(np.float32),
        "late": np.zeros(7, np.float32),
    }
    theirs = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in ours.items()}
    oracle = optax_lamb(list(theirs.values()), lr=1e-2, weight_decay=0.0)
    opt = create_optimizer("lamb", backend="cpu", lr=1e-2)
    for step in range(20):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in ours.items()}
        grads["still"][:] = 0.0
        if step < 5:
            grads["late"][:] = 0.0
        for k, t in theirs.items():
            t.grad = torch.from_numpy(grads[k].copy())
        oracle.step()
        opt.step_batch([(k, p.shape, p, grads[k]) for k, p in ours.items()])
        opt.end_iteration()
        for k, p in ours.items():
            np.testing.assert_allclose(
                p, theirs[k].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{k} @ {step}"
            )
    assert ours["zero"].any()
    assert ours["late"].any()


def test_converges_on_linear_regression() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    w_true = rng.standard_normal((4, 8)).astype(np.float32)
    y = x @ w_true.T
    w = (rng.standard_normal((4, 8)) * 0.1).astype(np.float32)

    def loss_and_grad() -> tuple[float, np.ndarray]:
        r = x @ w.T - y
        return float(0.5 * (r * r).sum(1).mean()), (r.T @ x / len(x)).astype(np.float32)

    opt = create_optimizer("lamb", lr=0.05)
    first = loss_and_grad()[0]
    steps = 300
    for i in range(steps):
        opt.set_lr(0.05 * (1 - i / steps))
        opt.step("w", w.shape, w, loss_and_grad()[1])
        opt.end_iteration()
    assert loss_and_grad()[0] < 1e-4 * first


def test_resume_is_bit_identical() -> None:
    assert_resume_bit_identical("lamb", {"lr": 1e-2, "weight_decay": 0.01})


@pytest.mark.parametrize(
    ("hparams", "exc", "message"),
    [
        ({"lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
        ({"lr": float("nan")}, ValueError, "Invalid learning rate: nan"),
        ({"betas": (1.2, 0.999)}, ValueError, "Invalid beta parameter at index 0: 1.2"),
        ({"betas": (0.9, 1.0)}, ValueError, "Invalid beta parameter at index 1: 1.0"),
        ({"eps": -1e-8}, ValueError, "Invalid epsilon value: -1e-08"),
        ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay value: -0.1"),
        ({"betas": (0.9,)}, ValueError, "betas must have 2 entries, got 1"),
        ({"lr": "0.1"}, TypeError, "lr must be a number, got '0.1'"),
        ({"momentum": 0.9}, TypeError, "lamb got unknown hyperparameter(s) 'momentum'"),
    ],
)
def test_invalid_hyperparameters(hparams: dict, exc: type, message: str) -> None:
    with pytest.raises(exc, match=re.escape(message)):
        create_optimizer("lamb", **hparams)


def test_defaults_are_optax_lamb_defaults() -> None:
    hp = create_optimizer("lamb").hyperparams
    assert (hp.lr, hp.betas, hp.eps, hp.weight_decay) == (1e-3, (0.9, 0.999), 1e-6, 0.0)


@pytest.mark.parametrize("shape", [(0,), (0, 3)])
def test_empty_tensor_is_a_no_op(shape: tuple[int, ...]) -> None:
    """A tensor with no elements next to a normal one: norms of nothing are 0, no error."""
    opt = create_optimizer("lamb", backend="cpu")
    p, q = np.zeros(shape, np.float32), np.ones((2, 2), np.float32)
    opt.step_batch([("e", shape, p, p.copy()), ("q", (2, 2), q, q.copy())])
    assert opt.state("e").shape == shape
    assert (q != 1.0).all()


@pytest.mark.gpu
def test_cuda_matches_reference() -> None:
    """Same fused arithmetic on the GPU; only the float64 norms sum in another order, which
    can flip the last bit of -lr * ratio, so whole steps agree to ~1 ulp of the update."""
    cp = cuda_or_skip()
    rng = np.random.default_rng(10)
    shapes = [(), (17,), (40_003,), (8, 9, 5), (3, 4)]
    host = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in shapes]
    host[-1][...] = 0.0
    dev = [cp.asarray(p) for p in host]
    ref = create_optimizer("lamb", backend="reference", **HPARAMS)
    gpu = create_optimizer("lamb", backend="cuda", **HPARAMS)
    names = [f"p{i}" for i in range(len(shapes))]
    for _ in range(10):
        grads = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in shapes]
        ref.step_batch(list(zip(names, shapes, host, grads, strict=True)))
        gpu.step_batch(list(zip(names, shapes, dev, map(cp.asarray, grads), strict=True)))
        ref.end_iteration()
        gpu.end_iteration()
    for a, b in zip(host, dev, strict=True):
        np.testing.assert_allclose(cp.asnumpy(b), a, rtol=1e-6, atol=1e-7)
