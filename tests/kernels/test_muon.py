"""Muon beyond the parity table (tests/kernels/oracles/muon.py): Newton–Schulz properties,
the AdamW fallback against torch.optim.AdamW, fused vs reference backends, flattening of
>= 3-D parameters, convergence, resume, and hyperparameter validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from stepd.kernels import create_optimizer, get_backend
from stepd.kernels.algorithms.muon import (
    MUON_APPLY,
    MUON_MOMENTUM,
    NS_COEFFICIENTS,
    adjust_lr_ratio,
    newton_schulz_orth,
)
from stepd.kernels.ops import Launch

from .gpu import cuda_or_skip
from .problems import linear_regression_loss_ratio

# -- Newton–Schulz -------------------------------------------------------------------------


def _with_singular_values(rng: np.random.Generator, rows: int, cols: int, s: np.ndarray):
    """G = P diag(s) Q^T with random orthonormal P, Q (float64)."""
    k = min(rows, cols)
    p, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    q, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    return p @ np.diag(s) @ q.T, p, q


def _scalar_iteration(s: np.ndarray, steps: int = 5) -> np.ndarray:
    """The quintic applied to singular values alone, float64: what NS must do to them."""
    a, b, c = NS_COEFFICIENTS
    x = s / np.sqrt(np.sum(s * s))  # ||G||_F = ||s||_2 (eps is negligible here)
    for _ in range(steps):
        x = a * x + b * x**3 + c * x**5
    return x


@pytest.mark.parametrize("shape", [(24, 10), (10, 24), (16, 16)], ids=["tall", "wide", "square"])
def test_ns_keeps_singular_vectors_and_maps_singular_values_into_the_band(shape) -> None:
    rng = np.random.default_rng(1)
    k = min(shape)
    s = np.geomspace(0.25, 1.0, k) * 3.0  # full rank, within NS's convergence region
    g, p, q = _with_singular_values(rng, *shape, s)
    o = newton_schulz_orth(g.astype(np.float32))
    assert o.dtype == np.float32
    assert o.shape == shape
    assert o.flags.c_contiguous
    # O = P f(S) Q^T: NS is a matrix polynomial in G G^T times G, so it keeps the singular
    # vectors and applies the scalar quintic to each singular value.
    expected = p @ np.diag(_scalar_iteration(s)) @ q.T
    np.testing.assert_allclose(o, expected, atol=2e-5)
    # Approximately orthogonal: singular values in the band the quintic settles into, and
    # O^T O (tall) / O O^T (wide) diagonal in the singular basis, i.e. no mixing of directions.
    sv = np.linalg.svd(o.astype(np.float64), compute_uv=False)
    assert sv.min() > 0.68, sv
    assert sv.max() < 1.14, sv
    gram = q.T @ o.T @ o @ q if shape[0] >= shape[1] else p.T @ o @ o.T @ p
    off = gram - np.diag(np.diag(gram))
    assert np.abs(off).max() < 1e-5
    # ... and close to the exact polar factor P Q^T within that band.
    assert np.linalg.norm(o - p @ q.T, 2) < 0.32


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 40)])
def test_ns_of_random_rectangular_matrices_lands_in_the_band(shape) -> None:
    g = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    sv = np.linalg.svd(newton_schulz_orth(g).astype(np.float64), compute_uv=False)
    assert sv.min() > 0.5, sv
    assert sv.max() < 1.2, sv


def test_ns_transposes_tall_matrices() -> None:
    g = np.random.default_rng(3).standard_normal((40, 12)).astype(np.float32)
    o = newton_schulz_orth(g)
    # A tall G runs as its (wide) transpose: exactly the same arithmetic as NS(G^T)^T.
    np.testing.assert_array_equal(o, newton_schulz_orth(np.ascontiguousarray(g.T)).T)
    assert o.shape == (40, 12)
    assert o.flags.c_contiguous
    # Columns orthonormal up to the band: O^T O (12 x 12) near I, O O^T (40 x 40) rank 12.
    eig = np.linalg.eigvalsh(o.T.astype(np.float64) @ o)
    assert eig.min() > 0.68**2
    assert eig.max() < 1.14**2


def test_ns_inputs_and_edge_cases() -> None:
    g = np.random.default_rng(4).standard_normal((5, 7))
    before = g.copy()
    o = newton_schulz_orth(g)  # float64 in: float32 out, xp inferred, input untouched
    assert o.dtype == np.float32
    np.testing.assert_array_equal(g, before)
    np.testing.assert_array_equal(o, newton_schulz_orth(g.astype(np.float32), xp=np))
    # Scale-invariant up to eps; the zero matrix stays zero (eps keeps it finite).
    np.testing.assert_allclose(newton_schulz_orth(1e3 * g), o, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(newton_schulz_orth(np.zeros((3, 4), np.float32)), 0.0)
    with pytest.raises(ValueError, match=r"needs a 2-D matrix, got shape \(2, 3, 4\)"):
        newton_schulz_orth(np.zeros((2, 3, 4), np.float32))


def test_adjust_lr_ratio_matches_torch_options() -> None:
    assert adjust_lr_ratio("original", 16, 9) == math.sqrt(16 / 9)
    assert adjust_lr_ratio("original", 9, 16) == 1.0
    assert adjust_lr_ratio("match_rms_adamw", 9, 16) == 0.2 * 4.0
    assert adjust_lr_ratio("match_rms_adamw", 64, 32) == 0.2 * 8.0


# -- the AdamW fallback --------------------------------------------------------------------

FALLBACK_SHAPES = ((), (1,), (37,), (5,))


@pytest.mark.parametrize("adamw_lr", [None, 3e-3])
def test_non_matrices_follow_torch_adamw(adamw_lr: float | None) -> None:
    """0-d / 1-D parameters: torch.optim.AdamW with the adamw_* hyperparameters, whose lr
    follows the group's lr schedule and lr_scale as lr_t * adamw_lr / lr."""
    lr0, scale = 0.02, 0.5
    rng = np.random.default_rng(5)
    ours = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in FALLBACK_SHAPES]
    theirs = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in ours]
    hp = {"adamw_betas": (0.8, 0.95), "adamw_eps": 1e-6, "adamw_weight_decay": 0.05}
    opt = create_optimizer("muon", lr=lr0, adamw_lr=adamw_lr, **hp)
    opt.set_lr_scale("p0", scale)
    base = lr0 if adamw_lr is None else adamw_lr
    ref = torch.optim.AdamW(
        [{"params": theirs[:1], "lr": base * scale}, {"params": theirs[1:]}],
        lr=base,
        betas=(0.8, 0.95),
        eps=1e-6,
        weight_decay=0.05,
    )
    for step in range(60):
        factor = 1.0 - step / 100  # a linear schedule on the group's lr
        opt.set_lr(lr0 * factor)
        ref.param_groups[0]["lr"] = base * factor * scale
        ref.param_groups[1]["lr"] = base * factor
        grads = [np.asarray(rng.standard_normal(p.shape), dtype=np.float32) for p in ours]
        for t, g in zip(theirs, grads, strict=True):
            t.grad = torch.from_numpy(g.copy())
        ref.step()
        opt.step_batch(
            [(f"p{i}", p.shape, p, g) for i, (p, g) in enumerate(zip(ours, grads, strict=True))]
        )
        opt.end_iteration()
        for p, t in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_slots_by_shape() -> None:
    opt = create_optimizer("muon")
    algo = opt.algorithm
    assert algo.slot_shapes((3, 4)) == {"momentum_buffer": (3, 4)}
    assert algo.slot_shapes((2, 3, 4)) == {"momentum_buffer": (2, 3, 4)}
    assert algo.slot_shapes((7,)) == {"exp_avg": (7,), "exp_avg_sq": (7,)}
    assert algo.slot_shapes(()) == {"exp_avg": (), "exp_avg_sq": ()}


# -- backends, flattening, empty matrices ---------------------------------------------------

MIXED = ((), (37,), (16, 9), (9, 16), (12, 12), (3, 5, 7), (256, 160))  # last: > 32768 elems


def _run(backend: str, hparams: dict, shapes=MIXED, steps: int = 8, flat: bool = False):
    rng = np.random.default_rng(6)
    opt = create_optimizer("muon", backend=backend, **hparams)
    params = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in shapes]
    if flat:  # the optimizer also takes flat buffers with the logical shape beside them
        params = [p.reshape(-1) for p in params]
    opt.set_lr_scale("p1", 0.25)
    for _ in range(steps):
        grads = [np.asarray(3 * rng.standard_normal(p.shape), np.float32) for p in params]
        opt.step_batch(
            [
                (f"p{i}", s, p, g)
                for i, (s, p, g) in enumerate(zip(shapes, params, grads, strict=True))
            ]
        )
        opt.end_iteration()
    return params, opt.state_dict()


@pytest.mark.parametrize(
    "hparams",
    [
        {"lr": 0.02},
        {"lr": 0.02, "nesterov": False, "adjust_lr_fn": "match_rms_adamw", "adamw_lr": 1e-3},
    ],
    ids=["nesterov", "plain"],
)
def test_fused_cpu_equals_reference_bitwise(hparams: dict) -> None:
    fused, fused_sd = _run("cpu", hparams)
    ref, ref_sd = _run("reference", hparams)
    flat, _ = _run("reference", hparams, flat=True)
    for i, (a, b, c) in enumerate(zip(fused, ref, flat, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"p{i}")
        np.testing.assert_array_equal(a.reshape(-1), c, err_msg=f"p{i} flat")
        for slot, buf in fused_sd["state"][f"p{i}"]["slots"].items():
            np.testing.assert_array_equal(buf, ref_sd["state"][f"p{i}"]["slots"][slot])


@pytest.mark.parametrize("nesterov", [0.0, 1.0])
def test_fused_ops_equal_reference_bitwise(nesterov: float) -> None:
    """The two ops alone, on sizes around the vector width and the parallel threshold."""
    rng = np.random.default_rng(8)
    sizes = [1, 15, 16, 17, 1000, 40_003]
    cpu, ref = get_backend("cpu"), get_backend("reference")
    m_args = MUON_MOMENTUM.pack({"one_minus_momentum": 0.05, "nesterov": nesterov})
    a_args = MUON_APPLY.pack({"decay": 1.0 - 0.02 * 0.1, "neg_lr": -0.02 * 1.7})
    results = []
    for backend in (cpu, ref):
        r = np.random.default_rng(9)
        bufs = [r.standard_normal(n).astype(np.float32) for n in sizes]
        params = [r.standard_normal(n).astype(np.float32) for n in sizes]
        outs = [np.full(n, np.nan, np.float32) for n in sizes]  # U ignores its input
        for _ in range(3):
            grads = [rng.standard_normal(n).astype(np.float32) for n in sizes]
            backend.launch(
                MUON_MOMENTUM,
                [Launch(u, g, [b], m_args) for u, g, b in zip(outs, grads, bufs, strict=True)],
            )
            backend.launch(
                MUON_APPLY, [Launch(p, u, [], a_args) for p, u in zip(params, outs, strict=True)]
            )
        results.append((bufs, params, outs))
        rng = np.random.default_rng(8)  # same grads for the second backend
    for x, y in zip(*results, strict=True):
        for a, b in zip(x, y, strict=True):
            np.testing.assert_array_equal(a, b)


def test_three_dim_params_are_flattened_to_shape0_by_rest() -> None:
    hp = {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw"}
    conv, _ = _run("cpu", hp, shapes=((6, 3, 2, 2), (3, 5, 7)))
    mat, _ = _run("cpu", hp, shapes=((6, 12), (3, 35)))
    for a, b in zip(conv, mat, strict=True):
        np.testing.assert_array_equal(a.reshape(b.shape), b)


def test_empty_matrix_is_a_no_op() -> None:
    opt = create_optimizer("muon", backend="cpu")
    for shape in ((0, 5), (5, 0), (3, 0, 2)):
        p = np.zeros(shape, np.float32)
        opt.step(f"e{shape}", shape, p, np.zeros(shape, np.float32))
        assert opt.state(f"e{shape}").slots["momentum_buffer"].shape == shape


@pytest.mark.gpu
def test_cuda_matches_reference() -> None:
    """The fused ops are bit-exact on the GPU; cuBLAS sums the NS matmuls in another order
    than NumPy's BLAS, so whole steps agree to rounding (~1e-6 in O, times lr in θ)."""
    cp = cuda_or_skip()
    rng = np.random.default_rng(10)
    shapes = MIXED
    host = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in shapes]
    dev = [cp.asarray(p) for p in host]
    ref = create_optimizer("muon", backend="reference", lr=0.02)
    gpu = create_optimizer("muon", backend="cuda", lr=0.02)
    for _ in range(10):
        grads = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in shapes]
        ref.step_batch(
            [
                (f"p{i}", s, p, g)
                for i, (s, p, g) in enumerate(zip(shapes, host, grads, strict=True))
            ]
        )
        gpu.step_batch(
            [
                (f"p{i}", s, p, cp.asarray(g))
                for i, (s, p, g) in enumerate(zip(shapes, dev, grads, strict=True))
            ]
        )
        ref.end_iteration()
        gpu.end_iteration()
    for a, b in zip(host, dev, strict=True):
        np.testing.assert_allclose(cp.asnumpy(b), a, rtol=1e-5, atol=1e-6)
    m_args = MUON_MOMENTUM.pack({"one_minus_momentum": 0.05, "nesterov": 1.0})
    g, buf = rng.standard_normal((2, 40_003)).astype(np.float32)
    u_ref, buf_ref = np.empty_like(g), buf.copy()
    get_backend("reference").launch(MUON_MOMENTUM, [Launch(u_ref, g, [buf_ref], m_args)])
    u_dev, buf_dev = cp.empty(g.shape, cp.float32), cp.asarray(buf)
    get_backend("cuda").launch(MUON_MOMENTUM, [Launch(u_dev, cp.asarray(g), [buf_dev], m_args)])
    np.testing.assert_array_equal(cp.asnumpy(u_dev), u_ref)
    np.testing.assert_array_equal(cp.asnumpy(buf_dev), buf_ref)


# -- convergence, resume -------------------------------------------------------------------


def test_converges_on_linear_regression() -> None:
    """W by Muon, b by the AdamW fallback, one group; lr decays linearly to 0."""
    opt = create_optimizer("muon", lr=0.1, weight_decay=0.0, adamw_weight_decay=0.0)
    assert linear_regression_loss_ratio(opt, lr=0.1, steps=200) < 1e-5


def test_resume_is_bit_identical() -> None:
    shapes = ((), (37,), (16, 9), (9, 16), (3, 5, 7))
    hp = {"lr": 0.02, "adamw_lr": 1e-3, "adjust_lr_fn": "match_rms_adamw"}
    rng = np.random.default_rng(12)
    params = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in shapes]
    grads = [
        [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in shapes] for _ in range(12)
    ]

    def run(opt, ps, steps) -> None:
        for gs in steps:
            opt.set_lr(opt.lr * 0.97)
            opt.step_batch(
                [(f"p{i}", s, p, g) for i, (s, p, g) in enumerate(zip(shapes, ps, gs, strict=True))]
            )
            opt.end_iteration()

    a = create_optimizer("muon", **hp)
    a.set_lr_scale("p2", 0.5)
    run(a, params, grads[:6])
    sd = json.loads(json.dumps({k: v for k, v in a.state_dict().items() if k != "state"}))
    sd["state"] = a.state_dict()["state"]  # metadata survives JSON (adjust_lr_fn, None)
    resumed_params = [p.copy() for p in params]
    b = create_optimizer("muon")  # default hyperparameters: replaced by the state_dict's
    b.load_state_dict(sd)
    assert b.hyperparams == a.hyperparams
    run(a, params, grads[6:])
    run(b, resumed_params, grads[6:])
    for x, y in zip(params, resumed_params, strict=True):
        np.testing.assert_array_equal(x, y)
    sa, sb = a.state_dict(), b.state_dict()
    for name, entry in sa["state"].items():
        for slot, buf in entry["slots"].items():
            np.testing.assert_array_equal(buf, sb["state"][name]["slots"][slot])


# -- validation ----------------------------------------------------------------------------

INVALID = [
    ({"lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
    ({"momentum": 1.0}, ValueError, "Invalid momentum value: 1.0"),
    ({"momentum": -0.1}, ValueError, "Invalid momentum value: -0.1"),
    ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay value: -0.1"),
    ({"ns_steps": 0}, ValueError, "Invalid ns_steps value: 0 (must be in [1, 99])"),
    ({"ns_steps": 100}, ValueError, "Invalid ns_steps value: 100 (must be in [1, 99])"),
    ({"ns_steps": 2.5}, TypeError, "ns_steps must be an integer, got 2.5"),
    ({"eps": -1e-7}, ValueError, "Invalid epsilon value: -1e-07"),
    (
        {"adjust_lr_fn": "none"},
        ValueError,
        "Invalid adjust_lr_fn value: 'none' (expected one of 'original', 'match_rms_adamw')",
    ),
    ({"adjust_lr_fn": None}, TypeError, "adjust_lr_fn must be a str, got None"),
    ({"nesterov": 1}, TypeError, "nesterov must be a bool, got 1"),
    ({"adamw_lr": -1.0}, ValueError, "Invalid adamw_lr value: -1.0"),
    (
        {"lr": 0.0, "adamw_lr": 1e-3},
        ValueError,
        "adamw_lr needs lr > 0: the AdamW fallback's lr is lr_t * adamw_lr / lr",
    ),
    ({"adamw_betas": (1.2, 0.9)}, ValueError, "Invalid beta parameter at index 0: 1.2"),
    ({"adamw_betas": (0.9, 1.0)}, ValueError, "Invalid beta parameter at index 1: 1.0"),
    ({"adamw_eps": -1.0}, ValueError, "Invalid adamw_eps value: -1.0"),
    ({"adamw_weight_decay": math.nan}, ValueError, "Invalid adamw_weight_decay value: nan"),
    ({"betas": (0.9, 0.99)}, TypeError, "muon got unknown hyperparameter(s) 'betas'; valid: "),
]


@pytest.mark.parametrize(("hparams", "exc", "message"), INVALID, ids=[m for *_, m in INVALID])
def test_invalid_hyperparameters(hparams: dict, exc: type, message: str) -> None:
    with pytest.raises(exc) as info:
        create_optimizer("muon", **hparams)
    if message.endswith("valid: "):
        assert str(info.value).startswith(message)
    else:
        assert str(info.value) == message
