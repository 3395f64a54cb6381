"""Kron-PSGD beyond the parity table (tests/kernels/oracles/kron.py): properties of the
preconditioner, the non-matrix path, backends, resume and validation."""

from __future__ import annotations

import re

import numpy as np
import pytest
from stepd.kernels import create_optimizer
from stepd.kernels.algorithms.kron import (
    norm_lower_bound,
    precond_update_due,
    probe_noise,
    solve_upper_right,
)

from .gpu import cuda_or_skip

# Triangular and diagonal factors (size 1; > max_size_triangular when that is 5), a vector,
# a scalar and a 3-D tensor (the last three: momentum SGD).
SHAPES = [(6, 5), (1, 7), (9, 3), (11,), (), (2, 3, 4)]


def _params(rng: np.random.Generator, shapes=SHAPES) -> dict[str, np.ndarray]:
    return {
        f"w{i}": np.asarray(rng.standard_normal(s), dtype=np.float32) for i, s in enumerate(shapes)
    }


def _run(opt, params: dict[str, np.ndarray], rng: np.random.Generator, steps: int) -> None:
    for _ in range(steps):
        batch = []
        for name, p in params.items():
            g = np.asarray(rng.standard_normal(p.shape) * 2, dtype=np.float32)
            batch.append((name, p.shape, p, g))
        opt.step_batch(batch)
        opt.end_iteration()


def _spd(rng: np.random.Generator, k: int, cond: float) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return (q * np.geomspace(1.0, cond, k)) @ q.T


# -- helpers ---------------------------------------------------------------------------------


def test_solve_upper_right_is_a_triangular_solve() -> None:
    rng = np.random.default_rng(0)
    q = np.triu(rng.standard_normal((7, 7))).astype(np.float32) + 3 * np.eye(7, dtype=np.float32)
    x = rng.standard_normal((4, 7)).astype(np.float32)
    y = solve_upper_right(np, x, q)
    assert y.dtype == np.float32
    assert y.shape == (4, 7)
    np.testing.assert_allclose(y @ q, x, rtol=1e-5, atol=1e-5)
    # Column j of x q^-1 depends only on columns <= j of x (q upper triangular).
    x2 = x.copy()
    x2[:, 4:] += 1.0
    np.testing.assert_array_equal(solve_upper_right(np, x2, q)[:, :4], y[:, :4])


def test_norm_lower_bound_is_a_tight_lower_bound() -> None:
    rng = np.random.default_rng(1)
    for k in (1, 2, 5, 30):
        a = rng.standard_normal((k, 2 * k)).astype(np.float32)
        s = a @ a.T  # symmetric PSD, as the factor updates use it
        exact = np.linalg.norm(s.astype(np.float64), 2)
        bound = float(norm_lower_bound(np, s))
        assert exact * 0.7 <= bound <= exact * (1 + 1e-5)
    assert float(norm_lower_bound(np, np.zeros((3, 3), np.float32))) == 0.0


def test_update_schedule_is_deterministic_in_t() -> None:
    assert all(precond_update_due(t, 1.0) for t in range(1, 50))
    assert not any(precond_update_due(t, 0.0) for t in range(1, 50))
    assert [t for t in range(1, 13) if precond_update_due(t, 0.25)] == [4, 8, 12]
    assert sum(precond_update_due(t, 0.3) for t in range(1, 1001)) == 300


def test_probe_noise_depends_on_seed_name_and_step_only() -> None:
    a = probe_noise(np, 0, "w", 3, (4, 5))
    assert a.dtype == np.float32
    assert a.shape == (4, 5)
    np.testing.assert_array_equal(a, probe_noise(np, 0, "w", 3, (4, 5)))
    for other in (probe_noise(np, 1, "w", 3, (4, 5)), probe_noise(np, 0, "v", 3, (4, 5))):
        assert not np.array_equal(a, other)
    assert not np.array_equal(a, probe_noise(np, 0, "w", 4, (4, 5)))


# -- the algorithm ---------------------------------------------------------------------------


def test_slot_shapes() -> None:
    kron = create_optimizer("kron", max_size_triangular=5).algorithm
    assert kron.slot_shapes((6, 5)) == {
        "momentum_buffer": (6, 5),
        "q_left": (6,),
        "q_right": (5, 5),
    }
    assert kron.slot_shapes((1, 3)) == {
        "momentum_buffer": (1, 3),
        "q_left": (1,),
        "q_right": (3, 3),
    }
    assert kron.slot_shapes((11,)) == {"momentum_buffer": (11,)}
    assert kron.slot_shapes(()) == {"momentum_buffer": ()}
    assert kron.slot_shapes((2, 3, 4)) == {"momentum_buffer": (2, 3, 4)}


@pytest.mark.parametrize("max_size", [8192, 5])
def test_zero_precond_lr_is_clipped_momentum_sgd(max_size: int) -> None:
    """With ``precond_lr = 0`` the factors stay ``I`` (updated by exactly zero, balanced by
    exactly one) and ``P G = G`` exactly; what is left is debiased momentum SGD with the RMS
    clip and decoupled decay, for matrices and non-matrices alike."""
    hp = {"lr": 0.05, "momentum": 0.8, "weight_decay": 0.1, "clip_update_rms": 0.5}
    opt = create_optimizer("kron", precond_lr=0.0, max_size_triangular=max_size, **hp)
    rng = np.random.default_rng(2)
    params = _params(rng)
    expected = {k: p.copy() for k, p in params.items()}
    bufs = {k: np.zeros_like(p) for k, p in params.items()}
    beta, one = np.float32(hp["momentum"]), np.float32(1)
    clipped = 0
    for t in range(1, 31):
        batch = []
        for name, p in params.items():
            g = np.asarray(rng.standard_normal(p.shape) * 3, dtype=np.float32)
            batch.append((name, p.shape, p, g))
            b = bufs[name]
            b[...] = b * beta + np.float32(1 - hp["momentum"]) * g
            u = b / np.float32(1 - hp["momentum"] ** t)
            rms = np.sqrt(np.mean(np.square(u)))
            scale = np.minimum(np.float32(hp["clip_update_rms"]) / (rms + np.float32(1e-6)), one)
            clipped += bool(scale < 1)
            u = u * scale
            e = expected[name]
            e[...] = e + np.float32(-hp["lr"]) * (u + np.float32(hp["weight_decay"]) * e)
        opt.step_batch(batch)
        opt.end_iteration()
    for name, p in params.items():
        np.testing.assert_array_equal(p, expected[name], err_msg=name)
        slots = opt.state(name).slots
        for side in ("q_left", "q_right"):
            if side in slots:
                q = slots[side]
                np.testing.assert_array_equal(
                    q, np.eye(len(q), dtype=np.float32) if q.ndim == 2 else 1
                )
    assert clipped > 0  # the clip did take part


def test_factors_stay_upper_triangular() -> None:
    opt = create_optimizer("kron", lr=0.01, precond_lr=0.5, max_size_triangular=8)
    rng = np.random.default_rng(3)
    params = _params(rng, [(6, 5), (12, 4), (3, 3)])
    _run(opt, params, rng, 40)
    for name in params:
        slots = opt.state(name).slots
        for side in ("q_left", "q_right"):
            q = slots[side]
            if q.ndim == 2:
                assert not np.tril(q, -1).any(), f"{name}.{side} has entries below the diagonal"
                assert (np.diag(q) > 0).all()
                assert not np.allclose(q, np.diag(np.diag(q)))  # and it did learn something
            else:
                assert (q > 0).all()


def test_preconditioner_whitens_gradients() -> None:
    """Gradients ``g = L Z R^T`` (``Z`` standard normal) have covariance ``S_L (x) S_R``; the
    fixed point of the factor update is ``P (S_L (x) S_R) P = I``. From ``P = I`` (where
    ``P S P = S`` has eigenvalues over [1, 300]) it gets there up to the noise of a constant
    step; the absolute scale too, not only the shape."""
    rng = np.random.default_rng(4)
    m, n = 6, 4
    s_left, s_right = _spd(rng, m, 30.0), _spd(rng, n, 10.0)
    chol_l, chol_r = np.linalg.cholesky(s_left), np.linalg.cholesky(s_right)
    # lr = 0: the parameter does not move; only the preconditioner learns.
    opt = create_optimizer("kron", lr=0.0, momentum=0.0, precond_lr=0.05)
    w = np.zeros((m, n), np.float32)
    for _ in range(2000):
        g = (chol_l @ rng.standard_normal((m, n)) @ chol_r.T).astype(np.float32)
        opt.step("w", (m, n), w, g)
        opt.end_iteration()
    slots = opt.state("w").slots
    q_l, q_r = slots["q_left"].astype(np.float64), slots["q_right"].astype(np.float64)
    p_l, p_r = q_l.T @ q_l, q_r.T @ q_r
    eig = np.linalg.eigvalsh(np.kron(p_l @ s_left @ p_l, p_r @ s_right @ p_r))
    assert eig.min() > 0.4, eig
    assert eig.max() < 2.5, eig
    assert 0.8 < np.exp(np.log(eig).mean()) < 1.25, eig


def test_converges_on_an_ill_conditioned_quadratic() -> None:
    """``f(W) = 1/2 <W - W*, A (W - W*) B>`` with cond(A) = cond(B) = 1e3 (1e6 overall),
    500 steps, linearly decaying lr: Kron gets f below 1e-6 f(0); the same clipped momentum
    SGD without the preconditioner (``precond_lr = 0``) stays above 1e-5 f(0) at every lr of
    a grid around its best."""
    rng = np.random.default_rng(2)
    m, n = 8, 6
    a, b = _spd(rng, m, 1e3), _spd(rng, n, 1e3)
    w_star = rng.standard_normal((m, n))

    def loss(w: np.ndarray) -> float:
        d = w - w_star
        return 0.5 * float(np.sum(d * (a @ d @ b)))

    def train(lr: float, precond_lr: float) -> float:
        opt = create_optimizer("kron", lr=lr, momentum=0.9, precond_lr=precond_lr)
        w = np.zeros((m, n), np.float32)
        for s in range(500):
            opt.set_lr(lr * (1 - s / 500))
            opt.step("w", (m, n), w, (a @ (w - w_star) @ b).astype(np.float32))
            opt.end_iteration()
        return loss(w)

    f0 = loss(np.zeros((m, n)))
    assert train(0.03, 0.1) < 1e-6 * f0
    assert min(train(lr, 0.0) for lr in (0.3, 0.1, 0.03, 0.01, 0.003)) > 1e-5 * f0


def test_update_prob_updates_factors_only_on_schedule() -> None:
    opt = create_optimizer("kron", lr=0.01, precond_update_prob=0.25)
    rng = np.random.default_rng(5)
    w = rng.standard_normal((5, 4)).astype(np.float32)
    changed = []
    for t in range(1, 13):
        before = opt.state("w").slots["q_left"].copy() if t > 1 else np.eye(5, dtype=np.float32)
        opt.step("w", w.shape, w, rng.standard_normal(w.shape).astype(np.float32))
        opt.end_iteration()
        if not np.array_equal(opt.state("w").slots["q_left"], before):
            changed.append(t)
    assert changed == [4, 8, 12]


def test_init_scale_and_no_clip() -> None:
    """``P = s^2 I`` before any update: with updates off and no clip, the step is s^2 G."""
    opt = create_optimizer(
        "kron",
        lr=0.1,
        momentum=0.0,
        precond_update_prob=0.0,
        precond_init_scale=4.0,
        clip_update_rms=None,
    )
    w = np.zeros((3, 2), np.float32)
    g = np.arange(6, dtype=np.float32).reshape(3, 2)
    opt.step("w", w.shape, w, g)
    np.testing.assert_allclose(opt.state("w").slots["q_left"], 2 * np.eye(3))
    np.testing.assert_allclose(w, -0.1 * 16 * g, rtol=1e-6)


def test_flat_buffers_and_empty_params() -> None:
    rng = np.random.default_rng(6)
    shaped = create_optimizer("kron", lr=0.01, max_size_triangular=5)
    flat = create_optimizer("kron", lr=0.01, max_size_triangular=5)
    params = _params(rng)
    flat_params = {k: p.reshape(-1).copy() for k, p in params.items()}
    for _ in range(5):
        grads = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()}
        shaped.step_batch([(k, p.shape, p, grads[k]) for k, p in params.items()])
        flat.step_batch(
            [(k, params[k].shape, p, grads[k].reshape(-1)) for k, p in flat_params.items()]
        )
        shaped.end_iteration()
        flat.end_iteration()
    for k, p in params.items():
        np.testing.assert_array_equal(p.reshape(-1), flat_params[k])
    empty = np.zeros((0, 4), np.float32)
    shaped.step("empty", (0, 4), empty, empty.copy())  # nothing to do, no error


def test_fused_cpu_equals_reference_backend() -> None:
    runs = {}
    for backend in ("cpu", "reference"):
        opt = create_optimizer(
            "kron", backend=backend, lr=0.02, weight_decay=0.1, max_size_triangular=5
        )
        rng = np.random.default_rng(7)
        params = _params(rng, [*SHAPES, (200, 3)])
        opt.set_lr_scale("w1", 0.5)
        _run(opt, params, rng, 15)
        runs[backend] = (params, opt.state_dict()["state"])
    (p_cpu, s_cpu), (p_ref, s_ref) = runs["cpu"], runs["reference"]
    for name in p_cpu:
        np.testing.assert_array_equal(p_cpu[name], p_ref[name], err_msg=name)
        for slot, buf in s_cpu[name]["slots"].items():
            np.testing.assert_array_equal(buf, s_ref[name]["slots"][slot], err_msg=slot)


def test_resume_is_bit_identical() -> None:
    hp = {"lr": 0.02, "weight_decay": 0.05, "precond_update_prob": 0.5, "seed": 3}
    rng = np.random.default_rng(8)
    params = _params(rng)
    grads = [
        {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()}
        for _ in range(20)
    ]

    def run(opt, ps: dict[str, np.ndarray], steps: list[dict[str, np.ndarray]]) -> None:
        for gs in steps:
            opt.step_batch([(k, p.shape, p, gs[k]) for k, p in ps.items()])
            opt.end_iteration()

    straight = create_optimizer("kron", **hp)
    p1 = {k: p.copy() for k, p in params.items()}
    run(straight, p1, grads)

    first = create_optimizer("kron", **hp)
    p2 = {k: p.copy() for k, p in params.items()}
    run(first, p2, grads[:9])
    resumed = create_optimizer("kron", **hp)
    resumed.load_state_dict(first.state_dict())
    run(resumed, p2, grads[9:])
    for k in params:
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "Invalid learning rate: -1.0"),
        ({"momentum": 1.0}, "Invalid momentum value: 1.0"),
        ({"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
        ({"precond_lr": 1.5}, "Invalid precond_lr value: 1.5"),
        ({"precond_update_prob": -0.1}, "Invalid precond_update_prob value: -0.1"),
        ({"precond_init_scale": 0.0}, "Invalid precond_init_scale value: 0.0"),
        ({"max_size_triangular": -1}, "Invalid max_size_triangular value: -1"),
        ({"clip_update_rms": 0.0}, "Invalid clip_update_rms value: 0.0"),
        ({"clip_update_rms": float("inf")}, "Invalid clip_update_rms value: inf"),
        ({"seed": -1}, "Invalid seed value: -1"),
    ],
)
def test_invalid_hyperparameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        create_optimizer("kron", **kwargs)
    assert str(info.value) == message


def test_does_not_take_a_hessian() -> None:
    opt = create_optimizer("kron")
    x = np.zeros(3, np.float32)
    with pytest.raises(TypeError, match="kron does not take a Hessian estimate"):
        opt.update_hessian("w", (3,), x)


@pytest.mark.gpu
@pytest.mark.parametrize("precond_lr", [0.0, 0.2])
def test_cuda_matches_reference(precond_lr: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """CuPy draws other probes than NumPy; with NumPy's probes uploaded, the GPU run is the
    reference run up to cuBLAS's summation order (the fused ops are bit-exact)."""
    cp = cuda_or_skip()
    import stepd.kernels.algorithms.kron as kron_module

    def host_probe(xp, seed, name, t, shape):
        return xp.asarray(probe_noise(np, seed, name, t, shape))

    monkeypatch.setattr(kron_module, "probe_noise", host_probe)
    rng = np.random.default_rng(14)
    shapes = [*SHAPES, (64, 40)]
    host = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in shapes]
    dev = [cp.asarray(p) for p in host]
    # max_size_triangular 50: (64, 40) takes a diagonal left and a triangular right factor.
    hp = {"lr": 0.02, "weight_decay": 0.1, "precond_lr": precond_lr, "max_size_triangular": 50}
    ref = create_optimizer("kron", backend="reference", **hp)
    gpu = create_optimizer("kron", backend="cuda", **hp)
    for _ in range(10):
        grads = [np.asarray(rng.standard_normal(s), dtype=np.float32) for s in shapes]
        names = [f"p{i}" for i in range(len(shapes))]
        ref.step_batch(list(zip(names, shapes, host, grads, strict=True)))
        gpu.step_batch(list(zip(names, shapes, dev, map(cp.asarray, grads), strict=True)))
        ref.end_iteration()
        gpu.end_iteration()
    for i, (a, b) in enumerate(zip(host, dev, strict=True)):
        np.testing.assert_allclose(cp.asnumpy(b), a, rtol=1e-4, atol=1e-5, err_msg=f"p{i}")
        for slot, buf in gpu.state(f"p{i}").slots.items():
            got, want = cp.asnumpy(buf), ref.state(f"p{i}").slots[slot]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=slot)
            if slot.startswith("q_") and got.ndim == 2:
                assert not np.tril(got, -1).any()
    # CuPy's own probes: same distribution, another stream; still finite and triangular.
    monkeypatch.undo()
    opt = create_optimizer("kron", backend="cuda", **hp)
    w = cp.asarray(host[0])
    for _ in range(5):
        opt.step("w", w.shape, w, cp.asarray(rng.standard_normal(w.shape), dtype=cp.float32))
        opt.end_iteration()
    assert bool(cp.isfinite(w).all())


def test_probe_noise_on_cupy_is_a_keyed_philox_draw(fake_cupy, monkeypatch) -> None:
    """On CuPy each probe comes from a Philox generator keyed by (seed, name, t): cheap to set
    up (XORWOW's states are set up by skip-ahead) and independent of what else is stepped."""
    keys: list[list[int]] = []
    philox = fake_cupy.random.Philox4x3210

    def recording(key: list[int]) -> object:
        keys.append(list(key))
        return philox(key)

    monkeypatch.setattr(fake_cupy.random, "Philox4x3210", recording)
    monkeypatch.setattr(
        fake_cupy.random, "default_rng", lambda *a: pytest.fail("XORWOW generator made")
    )
    a = probe_noise(fake_cupy, 0, "w", 3, (4, 5))
    assert isinstance(a, fake_cupy.ndarray)
    assert (a.dtype, a.shape) == (np.float32, (4, 5))
    np.testing.assert_array_equal(a.get(), probe_noise(fake_cupy, 0, "w", 3, (4, 5)).get())
    for other in (
        probe_noise(fake_cupy, 1, "w", 3, (4, 5)),
        probe_noise(fake_cupy, 0, "v", 3, (4, 5)),
        probe_noise(fake_cupy, 0, "w", 4, (4, 5)),
    ):
        assert not np.array_equal(a.get(), other.get())
    assert len(keys) == 5
    assert (keys[0][0], keys[0][2]) == (0, 3)  # seed, name's key, step
