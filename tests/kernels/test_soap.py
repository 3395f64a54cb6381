"""SOAP beyond the parity table (tests/kernels/oracles/soap.py): both sides of tall/wide
matrices and preconditioned vectors against the oracle, the first step and the refresh
schedule, slot layouts and dimension merging, fused vs reference backends, convergence,
resume, and hyperparameter validation."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_optimizer as po
import torch
from stepd.kernels import create_optimizer
from stepd.kernels.algorithms.soap import merge_small_dims

from .gpu import cuda_or_skip

# Our names -> pytorch_optimizer's.
PO_NAMES = {"max_precond_dim": "max_precondition_dim", "normalize_grads": "normalize_gradient"}


def _steps(opt, params: dict, grads: dict) -> None:
    opt.step_batch([(k, p.shape, p, grads[k]) for k, p in params.items()])
    opt.end_iteration()


# -- the oracle where the first factor is rank-deficient ------------------------------------


@pytest.mark.parametrize("hparams", [{}, {"normalize_grads": True, "weight_decay": 0.1}])
def test_both_sides_of_tall_and_wide_matrices_and_vectors_match_the_oracle(hparams) -> None:
    """``Q = eigh(L)`` is taken once, at the first step, from one gradient: for a tall ``G``
    ``L = G G^T`` has a null space whose eigenvectors are LAPACK's arbitrary choice (MKL's in
    torch, OpenBLAS's here), and they steer every later step: with a random first gradient
    these shapes end ~1e-2 apart after 50 steps, both being SOAP. A zero first gradient makes
    every factor ``1e-30 I``, whose eigenbasis both LAPACKs return as the identity; from then
    on the factors are full rank at every refresh (5 gradients of rank >= 4 per refresh for
    10 x 10 factors; 5 vectors for the 4 x 4 one), and the two agree like the parity table:
    the largest difference seen was 2.4e-7."""
    hp = {"lr": 3e-3, "precondition_frequency": 5, "precondition_1d": True, **hparams}
    # Not a long vector: its factor has rank <= 5 at the first refresh (5 gradients), and
    # QR of that rank-deficient power iterate is again LAPACK's choice beyond the rank.
    shapes = {"tall": (24, 8), "wide": (6, 10), "square": (10, 10), "vector": (4,)}
    rng = np.random.default_rng(5)
    ours = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    theirs = {k: torch.nn.Parameter(torch.from_numpy(p.copy())) for k, p in ours.items()}
    oracle = po.SOAP(list(theirs.values()), **{PO_NAMES.get(k, k): v for k, v in hp.items()})
    opt = create_optimizer("soap", backend="cpu", **hp)
    for step in range(50):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        if step == 0:
            grads = {k: np.zeros_like(g) for k, g in grads.items()}
        for k, t in theirs.items():
            t.grad = torch.from_numpy(grads[k].copy())
        oracle.step()
        _steps(opt, ours, grads)
        for k, p in ours.items():
            np.testing.assert_allclose(
                p, theirs[k].detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=f"{k} {step + 1}"
            )


# -- the first step and the refresh schedule ------------------------------------------------


def test_first_step_only_builds_the_preconditioner() -> None:
    opt = create_optimizer("soap", shampoo_beta=0.8)
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal((6, 4)).astype(np.float32)
    g = rng.standard_normal((6, 4)).astype(np.float32)
    p = p0.copy()
    opt.step("w", p.shape, p, g)
    np.testing.assert_array_equal(p, p0)  # not moved: weight decay included
    slots = opt.state("w").slots
    np.testing.assert_array_equal(slots["exp_avg"], 0.0)
    np.testing.assert_array_equal(slots["exp_avg_sq"], 0.0)
    for k, outer in enumerate((g @ g.T, g.T @ g)):
        gg, q = slots[f"GG{k}"], slots[f"Q{k}"].astype(np.float64)
        np.testing.assert_allclose(gg, np.float32(0.2) * outer, rtol=1e-6, atol=1e-6)
        # Q diagonalises GG, eigenvalues descending.
        np.testing.assert_allclose(q.T @ q, np.eye(len(q)), atol=1e-6)
        d = q.T @ gg @ q
        np.testing.assert_allclose(d - np.diag(np.diag(d)), 0.0, atol=1e-5)
        assert np.all(np.diff(np.diag(d)) <= 1e-5)


def test_a_late_name_also_skips_its_first_step() -> None:
    opt = create_optimizer("soap")
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 3)).astype(np.float32)
    for _ in range(3):
        opt.step("a", a.shape, a, rng.standard_normal((3, 3)).astype(np.float32))
        opt.end_iteration()
    b0 = rng.standard_normal(5).astype(np.float32)
    b = b0.copy()
    opt.step("b", b.shape, b, rng.standard_normal(5).astype(np.float32))
    np.testing.assert_array_equal(b, b0)
    opt.end_iteration()
    opt.step("b", b.shape, b, rng.standard_normal(5).astype(np.float32))
    assert np.all(b != b0)


def test_bases_refresh_every_precondition_frequency_steps() -> None:
    """Q changes after the factor update of steps t with (t - 1) % freq == 0, by QR (so it
    stays orthonormal), and exp_avg_sq is then only permuted: against a twin that never
    refreshes, the parameters agree up to that step and the second moments are the same
    multiset."""
    freq = 3
    rng = np.random.default_rng(3)
    p = rng.standard_normal((5, 4)).astype(np.float32)
    twin = p.copy()
    opt = create_optimizer("soap", precondition_frequency=freq)
    never = create_optimizer("soap", precondition_frequency=10**6)
    q_before = None
    for t in range(1, 12):
        g = rng.standard_normal(p.shape).astype(np.float32)
        opt.step("w", p.shape, p, g)
        never.step("w", twin.shape, twin, g.copy())
        slots = opt.state("w").slots
        q = [slots["Q0"].copy(), slots["Q1"].copy()]
        refreshed = t > 1 and (t - 1) % freq == 0
        if q_before is not None:
            changed = [not np.array_equal(a, b) for a, b in zip(q, q_before, strict=True)]
            assert changed == [refreshed] * 2, t
        if refreshed:
            for qk in q:
                np.testing.assert_allclose(qk.T @ qk, np.eye(len(qk)), atol=1e-5)
        if t <= 1 + freq:  # up to and including the first refresh
            np.testing.assert_array_equal(p, twin)
            v, v_never = slots["exp_avg_sq"], never.state("w").slots["exp_avg_sq"]
            np.testing.assert_array_equal(np.sort(v, axis=None), np.sort(v_never, axis=None))
        q_before = q
        opt.end_iteration()
        never.end_iteration()


def test_two_steps_in_one_iteration_stay_finite() -> None:
    # Both at t = 1: the second is an Adam step at s = max(t - 1, 1), not a division by 0.
    opt = create_optimizer("soap")
    p = np.ones((3, 2), np.float32)
    for _ in range(2):
        opt.step("w", p.shape, p, np.full((3, 2), 0.5, np.float32))
    assert np.isfinite(p).all()
    assert np.all(p != 1.0)


# -- layouts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "max_dim", "merged"),
    [
        ((1, 2, 512, 1, 2048, 1, 3, 4), 1024, (1024, 2048, 12)),  # the authors' example
        ((4, 4), 10000, (16,)),
        ((3, 5, 7), 16, (15, 7)),
        ((2048, 3), 1024, (2048, 3)),
        ((5, 1), 4, (5,)),
        ((2, 6, 3, 4), 16, (12, 12)),
        ((), 16, (1,)),
    ],
)
def test_merge_small_dims(shape, max_dim, merged) -> None:
    assert merge_small_dims(shape, max_dim) == merged


@pytest.mark.parametrize(
    ("shape", "hparams", "factors"),
    [
        ((), {}, {}),
        ((7,), {}, {}),
        ((7,), {"precondition_1d": True}, {0: 7}),
        ((7,), {"precondition_1d": True, "max_precond_dim": 6}, {}),
        ((6, 4), {}, {0: 6, 1: 4}),
        ((24, 8), {"max_precond_dim": 16}, {1: 8}),
        ((8, 24), {"max_precond_dim": 16}, {0: 8}),
        ((3, 5, 7), {}, {0: 3, 1: 5, 2: 7}),
        ((3, 5, 7), {"merge_dims": True, "max_precond_dim": 16}, {0: 15, 1: 7}),
        ((4, 4), {"merge_dims": True}, {0: 16}),
        # NHWC -> (2, 6, 3, 4) -> (12, 12); without merge_dims data_format has no effect.
        (
            (2, 3, 4, 6),
            {"merge_dims": True, "data_format": "channels_last", "max_precond_dim": 16},
            {0: 12, 1: 12},
        ),
        ((2, 3, 4, 6), {"data_format": "channels_last"}, {0: 2, 1: 3, 2: 4, 3: 6}),
        ((0, 5), {}, {1: 5}),
    ],
)
def test_slot_shapes(shape, hparams, factors) -> None:
    expected = {"exp_avg": shape, "exp_avg_sq": shape}
    for k, d in factors.items():
        expected |= {f"GG{k}": (d, d), f"Q{k}": (d, d)}
    slots = create_optimizer("soap", **hparams).algorithm.slot_shapes(shape)
    assert slots == expected
    assert list(slots) == list(expected)  # a fixed order


def test_an_empty_parameter_is_left_alone() -> None:
    opt = create_optimizer("soap")
    p = np.zeros((0, 5), np.float32)
    for _ in range(3):
        opt.step("e", p.shape, p, np.zeros((0, 5), np.float32))
        opt.end_iteration()
    np.testing.assert_array_equal(opt.state("e").slots["GG1"], 0.0)


# -- backends -------------------------------------------------------------------------------

MIXED = ((), (1,), (37,), (16, 9), (9, 16), (12, 12), (3, 5, 7), (2, 3, 4, 6), (256, 160))
BACKEND_CONFIGS = [
    {"precondition_frequency": 3, "max_precond_dim": 200},  # (256, 160): L is the identity
    {
        "precondition_frequency": 2,
        "betas": (0.3, 0.6),  # lerp weights >= 0.5
        "shampoo_beta": 0.4,
        "weight_decay": 0.1,
        "merge_dims": True,
        "data_format": "channels_last",
        "precondition_1d": True,
        "normalize_grads": True,
        "correct_bias": False,
        "max_precond_dim": 64,
    },
]


def _run(backend: str, hparams: dict, steps: int = 8, flat: bool = False, xp=np):
    rng = np.random.default_rng(6)
    opt = create_optimizer("soap", backend=backend, **hparams)
    params = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in MIXED]
    if flat:  # flat buffers with the logical shape beside them
        params = [p.reshape(-1) for p in params]
    params = [xp.asarray(p) for p in params]
    opt.set_lr_scale("p2", 0.25)
    for _ in range(steps):
        grads = [xp.asarray(3 * rng.standard_normal(p.shape), np.float32) for p in params]
        opt.step_batch(
            [
                (f"p{i}", s, p, g)
                for i, (s, p, g) in enumerate(zip(MIXED, params, grads, strict=True))
            ]
        )
        opt.end_iteration()
    return [getattr(xp, "asnumpy", np.asarray)(p) for p in params], opt.state_dict()


@pytest.mark.parametrize("hparams", BACKEND_CONFIGS, ids=["identity-side", "everything-on"])
def test_fused_cpu_equals_reference_bitwise(hparams: dict) -> None:
    """The matrix work is the same NumPy calls on both; the fused ops round like their
    NumPy references, so the two backends agree bit for bit (flat buffers too)."""
    fused, fused_sd = _run("cpu", hparams)
    ref, ref_sd = _run("reference", hparams)
    flat, _ = _run("reference", hparams, flat=True)
    for i, (a, b, c) in enumerate(zip(fused, ref, flat, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"p{i}")
        np.testing.assert_array_equal(a.reshape(-1), c, err_msg=f"p{i} flat")
    for name, st in fused_sd["state"].items():
        for slot, buf in st["slots"].items():
            assert buf.dtype == np.float32
            np.testing.assert_array_equal(buf, ref_sd["state"][name]["slots"][slot], slot)


@pytest.mark.gpu
def test_cuda_close_to_reference() -> None:
    """cuBLAS / cuSOLVER round differently from OpenBLAS, so this is a tolerance, not bits
    (the shapes keep every first-step factor full rank; see the parity module)."""
    cp = cuda_or_skip()
    hparams = BACKEND_CONFIGS[0]
    gpu, _ = _run("cuda", hparams, xp=cp)
    ref, _ = _run("reference", hparams)
    for i, (a, b) in enumerate(zip(gpu, ref, strict=True)):
        if MIXED[i] in ((16, 9), (9, 16)):  # a rank-deficient first factor (16 x 16, rank 9)
            continue
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"p{i}")


# -- convergence ----------------------------------------------------------------------------


def test_converges_on_ill_conditioned_least_squares_where_adam_stalls() -> None:
    """min 1/2 ||A X B - C||^2 with A (cond 10) and B (cond 5) in random bases: the Hessian
    (A^T A) x (B B^T) is Kronecker-factored like SOAP's preconditioner (condition 2500) and
    SOAP's bases align with it; Adam's coordinate-wise scaling cannot see the rotation."""
    rng = np.random.default_rng(0)

    def rotation(k: int) -> np.ndarray:
        return np.linalg.qr(rng.standard_normal((k, k)))[0]

    a = rotation(16) @ np.diag(np.geomspace(1, 10, 16)) @ rotation(16).T
    b = rotation(8) @ np.diag(np.geomspace(1, 5, 8)) @ rotation(8).T
    x_star = rng.standard_normal((16, 8))
    c = a @ x_star @ b

    def loss_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        r = a @ x @ b - c
        return 0.5 * float(np.sum(r * r)), (a.T @ r @ b.T).astype(np.float32)

    losses = {}
    for algorithm, extra in (("soap", {"precondition_frequency": 10}), ("adam", {})):
        x = np.zeros((16, 8), np.float32)
        opt = create_optimizer(algorithm, lr=0.1, betas=(0.9, 0.99), weight_decay=0.0, **extra)
        for step in range(400):
            _, g = loss_grad(x)
            opt.set_lr(0.1 * 0.5 * (1 + np.cos(np.pi * step / 400)))
            opt.step("x", x.shape, x, g)
            opt.end_iteration()
        losses[algorithm] = loss_grad(x)[0]
        if algorithm == "soap":
            np.testing.assert_allclose(x, x_star, atol=1e-4)
    initial = loss_grad(np.zeros((16, 8), np.float32))[0]  # ~1.2e4
    assert losses["soap"] < 1e-8 * initial, losses  # seen: 8.6e-11
    assert losses["adam"] > 1e-5 * initial, losses  # seen: 2.8


# -- resume ---------------------------------------------------------------------------------


def test_resume_is_bit_identical() -> None:
    """state_dict after 8 steps -> a fresh optimizer -> 9 more steps (refreshes at t = 11 and
    16) equals 17 uninterrupted steps, parameters and every slot."""
    shapes = {"m": (12, 12), "t": (24, 8), "v": (37,), "c": (3, 5, 7), "s": ()}
    hp = {"precondition_frequency": 5, "max_precond_dim": 16, "lr": 1e-2}
    rng = np.random.default_rng(9)
    init = {k: np.asarray(rng.standard_normal(s), np.float32) for k, s in shapes.items()}
    grads = [
        {k: np.asarray(rng.standard_normal(s), np.float32) for k, s in shapes.items()}
        for _ in range(17)
    ]

    def fresh():
        opt = create_optimizer("soap", **hp)
        opt.set_lr_scale("t", 0.5)
        return opt

    straight, params = fresh(), {k: v.copy() for k, v in init.items()}
    for g in grads:
        _steps(straight, params, g)
    first, resumed = fresh(), {k: v.copy() for k, v in init.items()}
    for g in grads[:8]:
        _steps(first, resumed, g)
    second = create_optimizer("soap")
    second.load_state_dict(first.state_dict())
    assert second.hyperparams == first.hyperparams
    for g in grads[8:]:
        _steps(second, resumed, g)
    for k in shapes:
        np.testing.assert_array_equal(resumed[k], params[k], err_msg=k)
        for slot, buf in straight.state(k).slots.items():
            np.testing.assert_array_equal(second.state(k).slots[slot], buf, err_msg=slot)


# -- hyperparameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
        ({"betas": (1.0, 0.9)}, ValueError, "Invalid beta parameter at index 0: 1.0"),
        ({"betas": (0.9, -0.1)}, ValueError, "Invalid beta parameter at index 1: -0.1"),
        ({"shampoo_beta": 1.0}, ValueError, "Invalid shampoo_beta value: 1.0"),
        ({"shampoo_beta": -1}, ValueError, "Invalid shampoo_beta value: -1.0"),
        ({"eps": -1e-8}, ValueError, "Invalid epsilon value: -1e-08"),
        ({"weight_decay": -0.1}, ValueError, "Invalid weight_decay value: -0.1"),
        ({"precondition_frequency": 0}, ValueError, "Invalid precondition_frequency value: 0"),
        ({"max_precond_dim": 0}, ValueError, "Invalid max_precond_dim value: 0"),
        (
            {"data_format": "nhwc"},
            ValueError,
            "Invalid data_format value: 'nhwc' (expected one of 'channels_first', 'channels_last')",
        ),
        (
            {"precondition_frequency": 2.5},
            TypeError,
            "precondition_frequency must be an integer, got 2.5",
        ),
        ({"merge_dims": 1}, TypeError, "merge_dims must be a bool, got 1"),
        ({"data_format": 4}, TypeError, "data_format must be a str, got 4"),
    ],
)
def test_invalid_hyperparameters(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        create_optimizer("soap", **kwargs)
    assert str(info.value) == message


def test_defaults_are_the_authors() -> None:
    hp = create_optimizer("soap").hyperparams
    assert hp.to_dict() == {
        "lr": 3e-3,
        "betas": [0.95, 0.95],
        "shampoo_beta": None,
        "eps": 1e-8,
        "weight_decay": 1e-2,
        "precondition_frequency": 10,
        "max_precond_dim": 10000,
        "merge_dims": False,
        "precondition_1d": False,
        "normalize_grads": False,
        "data_format": "channels_first",
        "correct_bias": True,
        "maximize": False,
        "step_count": "global",
    }
    with pytest.raises(TypeError, match=r"soap got unknown hyperparameter\(s\) 'precond_freq'"):
        create_optimizer("soap", precond_freq=5)
