"""MARS-AdamW beyond the parity table: fused vs reference bit for bit, the unclipped branch
and the first step against pytorch-optimizer, slots by shape, chunked norms, convergence,
resume, and bad hyperparameters."""

from __future__ import annotations

import re

import numpy as np
import pytest
import pytorch_optimizer as po
import stepd.kernels.algorithms.mars as mars_module
import torch
from stepd.kernels import create_optimizer
from stepd.kernels.algorithms.mars import MARS_ADAMW, MARS_ADAMW_1D, MARS_CORRECT
from stepd.kernels.backends import get_backend
from stepd.kernels.hyperparams import SHARED
from stepd.kernels.ops import Launch

from .gpu import cuda_or_skip
from .problems import assert_resume_bit_identical, linear_regression_loss_ratio

# 0-d and 1-D (AdamW unless optimize_1d), matrices around the vector width and across the
# parallel threshold (32768 elements), a 3-D tensor.
SHAPES = {"s": (), "b": (17,), "m": (3, 5), "n": (4, 4), "big": (191, 211), "w": (8, 9, 5)}


def _run(
    backend: str, hparams: dict, steps: int, batched: bool = True, seed: int = 7
) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    opt = create_optimizer("mars", backend=backend, **hparams)
    params = {k: np.asarray(rng.standard_normal(s), np.float32) for k, s in SHAPES.items()}
    opt.set_lr_scale("n", 0.25)  # per-tensor scalars inside one launch
    for step in range(steps):
        # Small gradients first (||c|| < 1, no clip), then large ones (clipped).
        scale = 1e-3 if step < steps // 2 else 3.0
        items = [
            (k, p.shape, p, np.asarray(rng.standard_normal(p.shape) * scale, np.float32))
            for k, p in params.items()
        ]
        if batched:
            opt.step_batch(items)
        else:
            for item in items:
                opt.step(*item)
        opt.end_iteration()
    return params, opt.state_dict()


HPARAMS = [
    {"lr": 1e-2, "weight_decay": 0.1, "optimize_1d": True},
    {"lr": 1e-2, "weight_decay": 0.1, "lr_1d": 3e-3},
]


@pytest.mark.parametrize("hparams", HPARAMS, ids=["optimize-1d", "adamw-1d"])
def test_fused_cpu_equals_reference_bitwise(hparams: dict) -> None:
    fused, fused_sd = _run("cpu", hparams, steps=12)
    ref, ref_sd = _run("reference", hparams, steps=12)
    for name, p in fused.items():
        np.testing.assert_array_equal(p, ref[name], err_msg=name)
        for slot, buf in fused_sd["state"][name]["slots"].items():
            np.testing.assert_array_equal(buf, ref_sd["state"][name]["slots"][slot], err_msg=slot)


def test_batched_launch_equals_one_call_per_tensor() -> None:
    a, _ = _run("cpu", HPARAMS[1], steps=4, batched=True)
    b, _ = _run("cpu", HPARAMS[1], steps=4, batched=False)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.parametrize("op", [MARS_CORRECT, MARS_ADAMW, MARS_ADAMW_1D], ids=lambda o: o.name)
def test_fused_ops_equal_reference_bitwise(op) -> None:
    rng = np.random.default_rng(5)
    n = 40_003
    scalars = {
        "coef": 0.475,
        "decay": 0.999,
        "neg_lr": -3e-3,
        "one_minus_beta1": 0.05,
        "beta2": 0.99,
        "one_minus_beta2": 0.01,
        "bias_correction1": 0.14,
        "bias_correction2_sqrt": 0.17,
        "eps": 1e-8,
        "v_eps": 1e-15,
        "clip": 37.5,
    }
    args = op.pack(scalars)
    p, g, m, last = rng.standard_normal((4, n)).astype(np.float32)
    v = np.abs(rng.standard_normal(n)).astype(np.float32)
    slots = {"exp_avg": m, "exp_avg_sq": v, "last_grad": last}
    out = {}
    for backend in ("cpu", "reference"):
        bufs = [p.copy(), g.copy(), *(slots[k].copy() for k in op.slots)]
        get_backend(backend).launch(op, [Launch(bufs[0], bufs[1], bufs[2:], args)])
        out[backend] = bufs
    for x, y in zip(out["cpu"], out["reference"], strict=True):
        np.testing.assert_array_equal(x, y)


def test_slots_by_shape() -> None:
    full = {"exp_avg", "exp_avg_sq", "last_grad"}
    for shape, optimize_1d, want in [
        ((), False, {"exp_avg", "exp_avg_sq"}),
        ((5,), False, {"exp_avg", "exp_avg_sq"}),
        ((), True, full),
        ((5,), True, full),
        ((2, 3), False, full),
        ((2, 3, 4), False, full),
    ]:
        opt = create_optimizer("mars", optimize_1d=optimize_1d)
        p, g = np.ones(shape, np.float32), np.full(shape, 2.0, np.float32)
        opt.step("x", shape, p, g)
        assert set(opt.state("x").slots) == want, (shape, optimize_1d)
        if "last_grad" in want:  # holds g after the step (c only inside it)
            np.testing.assert_array_equal(opt.state("x").slots["last_grad"], g)


def _compare_with_oracle(grad_scale: float, steps: int, **hparams) -> None:
    rng = np.random.default_rng(4)
    shapes = [(), (6,), (5, 7)]
    ours = [np.asarray(rng.standard_normal(s), np.float32) for s in shapes]
    theirs = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in ours]
    oracle = po.MARS(theirs, **hparams)
    opt = create_optimizer("mars", backend="cpu", **hparams)
    names = [f"p{i}" for i in range(len(shapes))]
    for step in range(steps):
        grads = [np.asarray(rng.standard_normal(s) * grad_scale, np.float32) for s in shapes]
        for t, g in zip(theirs, grads, strict=True):
            t.grad = torch.from_numpy(g.copy())
        oracle.step()
        opt.step_batch(list(zip(names, shapes, ours, grads, strict=True)))
        opt.end_iteration()
        for name, p, t in zip(names, ours, theirs, strict=True):
            np.testing.assert_allclose(
                p, t.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{name} @ {step + 1}"
            )


def test_unclipped_branch_matches_oracle() -> None:
    """Small gradients keep ||c|| < 1 on every step (the table's mostly clip)."""
    _compare_with_oracle(1e-3, 50, lr=1e-2, weight_decay=0.05, optimize_1d=True)


def test_first_step_matches_oracle() -> None:
    """g_prev = 0 on the first step: c = (1 + gamma b1 / (1 - b1)) g, then clipped, for
    both branches of the clip (one tiny gradient, one large), and the 1-D AdamW path."""
    _compare_with_oracle(1e-3, 1, lr=0.1, gamma=0.5, optimize_1d=True)
    _compare_with_oracle(10.0, 1, lr=0.1, gamma=0.5, optimize_1d=True)
    _compare_with_oracle(1.0, 1, lr=0.1, lr_1d=0.3, gamma=0.5)


def test_chunked_norm_agrees_with_one_chunk(monkeypatch) -> None:
    one, _ = _run("cpu", HPARAMS[0], steps=3)
    monkeypatch.setattr(mars_module, "_CHUNK", 1000)
    chunked, _ = _run("cpu", HPARAMS[0], steps=3)
    for name in one:
        np.testing.assert_allclose(chunked[name], one[name], rtol=1e-6, atol=1e-7)


def test_converges_on_linear_regression() -> None:
    """W by MARS, b by the 1-D AdamW, one group; lr decays linearly to 0."""
    opt = create_optimizer("mars", lr=0.05, lr_1d=0.05, weight_decay_1d=0.0)
    assert linear_regression_loss_ratio(opt, lr=0.05, steps=300) < 1e-4


@pytest.mark.parametrize("hparams", HPARAMS, ids=["optimize-1d", "adamw-1d"])
def test_resume_is_bit_identical(hparams: dict) -> None:
    assert_resume_bit_identical("mars", hparams)


def test_defaults_are_pytorch_optimizer_defaults() -> None:
    hp = create_optimizer("mars").hyperparams
    defaults = po.MARS([torch.nn.Parameter(torch.zeros(1))]).defaults
    for name in hp.names():
        if name not in SHARED:  # the options every stepd algorithm takes (MARS has neither)
            assert getattr(hp, name) == defaults[name], name


@pytest.mark.parametrize(
    ("hparams", "exc", "message"),
    [
        ({"lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
        ({"betas": (1.2, 0.99)}, ValueError, "Invalid beta parameter at index 0: 1.2"),
        ({"betas": (0.95, 1.0)}, ValueError, "Invalid beta parameter at index 1: 1.0"),
        ({"gamma": -0.1}, ValueError, "Invalid gamma value: -0.1"),
        ({"gamma": float("inf")}, ValueError, "Invalid gamma value: inf"),
        ({"eps": -1e-8}, ValueError, "Invalid epsilon value: -1e-08"),
        ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay value: -0.1"),
        ({"lr_1d": -1.0}, ValueError, "Invalid lr_1d value: -1.0"),
        ({"betas_1d": (0.9, 1.5)}, ValueError, "Invalid betas_1d parameter at index 1: 1.5"),
        ({"weight_decay_1d": -1.0}, ValueError, "Invalid weight_decay_1d value: -1.0"),
        (
            {"lr": 0.0},
            ValueError,
            "lr_1d needs lr > 0 when optimize_1d is False: the 1-D lr is lr_t * lr_1d / lr",
        ),
        ({"optimize_1d": 1}, TypeError, "optimize_1d must be a bool, got 1"),
        ({"mars_type": "lion"}, TypeError, "mars got unknown hyperparameter(s) 'mars_type'"),
    ],
)
def test_invalid_hyperparameters(hparams: dict, exc: type, message: str) -> None:
    with pytest.raises(exc, match=re.escape(message)):
        create_optimizer("mars", **hparams)


def test_zero_lr_is_fine_when_every_parameter_takes_mars() -> None:
    opt = create_optimizer("mars", lr=0.0, optimize_1d=True)
    p = np.ones(3, np.float32)
    opt.step("b", (3,), p, np.ones(3, np.float32))
    np.testing.assert_array_equal(p, np.ones(3))


@pytest.mark.parametrize("shape", [(0,), (0, 3)])
def test_empty_tensor_is_a_no_op(shape: tuple[int, ...]) -> None:
    """A tensor with no elements next to a normal one: norms of nothing are 0, no error."""
    opt = create_optimizer("mars", backend="cpu")
    p, q = np.zeros(shape, np.float32), np.ones((2, 2), np.float32)
    opt.step_batch([("e", shape, p, p.copy()), ("q", (2, 2), q, q.copy())])
    assert opt.state("e").shape == shape
    assert (q != 1.0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("hparams", HPARAMS, ids=["optimize-1d", "adamw-1d"])
def test_cuda_matches_reference(hparams: dict) -> None:
    """Same fused arithmetic on the GPU; only the float64 norm sums in another order, which
    can flip the last bit of the clip, so whole steps agree to ~1 ulp of the update."""
    cp = cuda_or_skip()
    rng = np.random.default_rng(10)
    shapes = list(SHAPES.values())
    names = list(SHAPES)
    host = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in shapes]
    dev = [cp.asarray(p) for p in host]
    ref = create_optimizer("mars", backend="reference", **hparams)
    gpu = create_optimizer("mars", backend="cuda", **hparams)
    for _ in range(10):
        grads = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in shapes]
        ref.step_batch(list(zip(names, shapes, host, grads, strict=True)))
        gpu.step_batch(list(zip(names, shapes, dev, map(cp.asarray, grads), strict=True)))
        ref.end_iteration()
        gpu.end_iteration()
    for a, b in zip(host, dev, strict=True):
        np.testing.assert_allclose(cp.asnumpy(b), a, rtol=1e-6, atol=1e-7)
