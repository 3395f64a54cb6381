"""The in-process Optimizer: rlx-optim semantics, state_dict round trips, and bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from stepd.kernels import create_optimizer
from stepd.kernels.algorithms import ALGORITHMS, ElementwiseAlgorithm

# The elementwise family; the matrix-aware algorithms have tests of their own.
ELEMENTWISE = sorted(n for n, c in ALGORITHMS.items() if issubclass(c, ElementwiseAlgorithm))
HPARAMS = {"sgd": {"lr": 0.05, "momentum": 0.9}}


def _grads(seed: int, shapes: dict[str, tuple[int, ...]], steps: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        for _ in range(steps)
    ]


def _snapshot(opt) -> dict:
    return copy.deepcopy(opt.state_dict())


def _assert_same_state(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if k != "state"} == {
        k: v for k, v in b.items() if k != "state"
    }
    assert a["state"].keys() == b["state"].keys()
    for name in a["state"]:
        sa, sb = a["state"][name], b["state"][name]
        assert (sa["shape"], sa["count"]) == (sb["shape"], sb["count"])
        for slot in sa["slots"]:
            np.testing.assert_array_equal(sa["slots"][slot], sb["slots"][slot])


# -- semantics ---------------------------------------------------------------------------


def test_state_is_created_lazily_at_zero() -> None:
    opt = create_optimizer("adamw", backend="cpu")
    assert opt.names() == []
    p = np.ones((2, 3), np.float32)
    opt.step("w", (2, 3), p, np.zeros((2, 3), np.float32))
    st = opt.state("w")
    assert st.shape == (2, 3)
    assert st.count == 1
    assert set(st.slots) == {"exp_avg", "exp_avg_sq"}
    assert all(not s.any() for s in st.slots.values())  # zero grad keeps moments at zero


def test_global_step_is_shared_and_advanced_only_by_end_iteration() -> None:
    # Adam's first step moves every coordinate by ~lr whatever the gradient's scale; a
    # parameter first stepped at t = 3 gets t = 3's bias correction instead (rlx-optim).
    opt = create_optimizer("adam", backend="cpu", lr=0.1)
    assert opt.global_step == 0
    p = np.zeros(4, np.float32)
    g = np.full(4, 1e-3, np.float32)
    opt.step("a", (4,), p, g)
    np.testing.assert_allclose(p, -0.1, rtol=1e-4)
    opt.step("a", (4,), p, g)  # same iteration: t stays 1
    assert opt.end_iteration() == 1
    assert opt.end_iteration() == 2
    late = np.zeros(4, np.float32)
    opt.step("late", (4,), late, g)  # t = 3 for a fresh name
    b1, b2 = 0.9, 0.999
    m_hat = (1 - b1) * 1e-3 / (1 - b1**3)
    v_hat = (1 - b2) * 1e-6 / (1 - b2**3)
    np.testing.assert_allclose(late, -0.1 * m_hat / (np.sqrt(v_hat) + 1e-8), rtol=1e-4)


@pytest.mark.parametrize("algorithm", ELEMENTWISE)
def test_lr_scale_multiplies_lr_inside_the_step(algorithm: str) -> None:
    hp = HPARAMS.get(algorithm, {"lr": 1e-2})
    scaled = create_optimizer(algorithm, backend="cpu", **hp)
    scaled.set_lr_scale("w", 0.5)
    plain = create_optimizer(algorithm, backend="cpu", **{**hp, "lr": hp["lr"] * 0.5})
    assert scaled.lr_scale("w") == 0.5
    assert scaled.lr_scale("other") == 1.0
    pa, pb = np.ones(9, np.float32), np.ones(9, np.float32)
    for g in _grads(1, {"w": (9,)}, 5):
        scaled.step("w", (9,), pa, g["w"])
        plain.step("w", (9,), pb, g["w"])
        scaled.end_iteration()
        plain.end_iteration()
    np.testing.assert_array_equal(pa, pb)


def test_set_lr_changes_the_next_steps() -> None:
    a = create_optimizer("sgd", backend="cpu", lr=0.1)
    p = np.ones(3, np.float32)
    a.step("w", (3,), p, np.ones(3, np.float32))
    a.set_lr(0.01)
    assert a.lr == 0.01
    a.step("w", (3,), p, np.ones(3, np.float32))
    np.testing.assert_allclose(p, 1 - 0.1 - 0.01, rtol=1e-6)


@pytest.mark.parametrize("algorithm", ELEMENTWISE)
def test_resume_from_state_dict_is_bit_identical(algorithm: str) -> None:
    hp = HPARAMS.get(algorithm, {"lr": 1e-2, "weight_decay": 0.01})
    shapes = {"w": (8, 5), "b": (5,)}
    grads = _grads(2, shapes, 20)
    rng = np.random.default_rng(0)
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}

    straight = create_optimizer(algorithm, backend="cpu", **hp)
    straight.set_lr_scale("b", 0.3)
    ps = {k: v.copy() for k, v in init.items()}
    for g in grads:
        straight.step_batch([(k, shapes[k], ps[k], g[k]) for k in shapes])
        straight.end_iteration()

    first = create_optimizer(algorithm, backend="cpu", **hp)
    first.set_lr_scale("b", 0.3)
    pr = {k: v.copy() for k, v in init.items()}
    for g in grads[:7]:
        first.step_batch([(k, shapes[k], pr[k], g[k]) for k in shapes])
        first.end_iteration()
    saved = first.state_dict()
    resumed = create_optimizer(algorithm, backend="cpu")  # default hparams: loaded from sd
    resumed.load_state_dict(saved)
    for g in grads[7:]:
        resumed.step_batch([(k, shapes[k], pr[k], g[k]) for k in shapes])
        resumed.end_iteration()
    for k in shapes:
        np.testing.assert_array_equal(pr[k], ps[k])
    _assert_same_state(resumed.state_dict(), straight.state_dict())


def test_state_dict_is_a_copy() -> None:
    opt = create_optimizer("adamw", backend="cpu")
    p = np.ones(4, np.float32)
    opt.step("w", (4,), p, np.ones(4, np.float32))
    sd = opt.state_dict()
    before = sd["state"]["w"]["slots"]["exp_avg"].copy()
    opt.step("w", (4,), p, np.ones(4, np.float32))
    np.testing.assert_array_equal(sd["state"]["w"]["slots"]["exp_avg"], before)


# -- bad input: a clear error and nothing changes ---------------------------------------


def _primed():
    opt = create_optimizer("adamw", backend="cpu", lr=1e-2)
    p = np.ones((3, 4), np.float32)
    opt.step("w", (3, 4), p, np.full((3, 4), 0.5, np.float32))
    opt.end_iteration()
    return opt, p


GOOD_G = np.ones((3, 4), np.float32)

BAD_STEPS = [
    ("float64 grad", ("w", (3, 4), None, np.ones((3, 4))), TypeError, "grad must be float32"),
    ("list grad", ("w", (3, 4), None, [1.0] * 12), TypeError, "grad must be a numpy.ndarray"),
    ("short grad", ("w", (3, 4), None, np.ones(11, np.float32)), ValueError, "has 11 elements"),
    (
        "strided grad",
        ("w", (3, 4), None, np.ones((3, 8), np.float32)[:, ::2]),
        ValueError,
        "C-contiguous",
    ),
    ("changed shape", ("w", (4, 3), None, GOOD_G), ValueError, "differs from its registered"),
    ("negative dim", ("w", (-3, -4), None, GOOD_G), ValueError, "non-negative ints"),
    ("float dim", ("w", (3.0, 4), None, GOOD_G), ValueError, "non-negative ints"),
    ("empty name", ("", (3, 4), None, GOOD_G), TypeError, "non-empty str"),
]


@pytest.mark.parametrize(
    ("args", "exc", "match"), [b[1:] for b in BAD_STEPS], ids=[b[0] for b in BAD_STEPS]
)
def test_bad_step_raises_and_changes_nothing(args, exc, match) -> None:
    opt, p = _primed()
    before, p_before = _snapshot(opt), p.copy()
    name, shape, _, grad = args
    with pytest.raises(exc, match=match):
        opt.step(name, shape, p, grad)
    _assert_same_state(opt.state_dict(), before)
    np.testing.assert_array_equal(p, p_before)


def test_bad_param_raises_and_changes_nothing() -> None:
    opt, p = _primed()
    before = _snapshot(opt)
    ro = p.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="must be writable"):
        opt.step("w", (3, 4), ro, GOOD_G)
    with pytest.raises(TypeError, match="param must be float32"):
        opt.step("w", (3, 4), p.astype(np.float16), GOOD_G)
    with pytest.raises(ValueError, match="C-contiguous"):
        opt.step("w", (3, 4), np.asfortranarray(p), GOOD_G)
    _assert_same_state(opt.state_dict(), before)


def test_one_bad_item_in_a_batch_changes_nothing() -> None:
    opt, p = _primed()
    before, p_before = _snapshot(opt), p.copy()
    fresh = np.ones(5, np.float32)
    with pytest.raises(ValueError, match="has 4 elements"):
        opt.step_batch(
            [
                ("w", (3, 4), p, GOOD_G),
                ("new", (5,), fresh, np.ones(5, np.float32)),
                ("bad", (5,), np.ones(5, np.float32), np.ones(4, np.float32)),
            ]
        )
    _assert_same_state(opt.state_dict(), before)
    np.testing.assert_array_equal(p, p_before)
    assert "new" not in opt.names()


def test_duplicate_name_in_a_batch_is_refused() -> None:
    opt, p = _primed()
    q = p.copy()
    with pytest.raises(ValueError, match="'w' appears more than once"):
        opt.step_batch([("w", (3, 4), p, GOOD_G), ("w", (3, 4), q, GOOD_G)])


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda o: o.set_lr(-1.0), ValueError, "Invalid learning rate: -1.0"),
        (lambda o: o.set_lr(float("nan")), ValueError, "Invalid learning rate: nan"),
        (lambda o: o.set_lr_scale("w", -0.5), ValueError, "Invalid lr_scale for 'w': -0.5"),
        (lambda o: o.set_lr_scale("w", float("inf")), ValueError, "Invalid lr_scale"),
        (lambda o: o.update_hessian("w", (3, 4), GOOD_G), TypeError, "adamw does not take"),
    ],
)
def test_bad_setting_raises_and_changes_nothing(call, exc, match) -> None:
    opt, _ = _primed()
    before = _snapshot(opt)
    with pytest.raises(exc, match=match):
        call(opt)
    _assert_same_state(opt.state_dict(), before)


def _corrupt(sd: dict, path: tuple, value) -> dict:
    sd = copy.deepcopy(sd)
    node = sd
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return sd


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("algorithm",), "sgd", "for algorithm 'sgd'"),
        (("global_step",), -1, "global_step must be an int >= 0"),
        (("lr",), -2.0, "Invalid learning rate"),
        (("hyperparams", "betas"), [1.5, 0.9], "Invalid beta parameter at index 0: 1.5"),
        (("lr_scales",), {"w": -1.0}, "Invalid lr_scale"),
        (("state", "w", "slots", "exp_avg"), np.zeros((4, 3), np.float32), "must be float32"),
        (("state", "w", "slots", "exp_avg"), np.zeros((3, 4)), "must be float32"),
        (("state", "w", "slots"), {"exp_avg": np.zeros((3, 4), np.float32)}, "slots"),
    ],
)
def test_bad_state_dict_raises_and_changes_nothing(path, value, match) -> None:
    opt, _ = _primed()
    before = _snapshot(opt)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(_corrupt(opt.state_dict(), path, value))
    _assert_same_state(opt.state_dict(), before)


# -- construction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "hparams", "exc", "message"),
    [
        ("adamw", {"lr": -1.0}, ValueError, "Invalid learning rate: -1.0"),
        ("adam", {"betas": (1.2, 0.999)}, ValueError, "Invalid beta parameter at index 0: 1.2"),
        ("adam", {"betas": (0.9, 1.0)}, ValueError, "Invalid beta parameter at index 1: 1.0"),
        ("adamw", {"eps": -1e-8}, ValueError, "Invalid epsilon value: -1e-08"),
        ("adamw", {"weight_decay": -0.1}, ValueError, "Invalid weight_decay value: -0.1"),
        ("sgd", {"momentum": -0.5}, ValueError, "Invalid momentum value: -0.5"),
        ("sgd", {"dampening": 1.5}, ValueError, "Invalid dampening value: 1.5"),
        (
            "sgd",
            {"nesterov": True},
            ValueError,
            "Nesterov momentum requires a momentum and zero dampening",
        ),
        ("qhadamw", {"nus": (0.7, 1.5)}, ValueError, "Invalid nus[1] value: 1.5"),
        ("nadamw", {"momentum_decay": -1.0}, ValueError, "Invalid momentum_decay value: -1.0"),
        ("adam", {"betas": (0.9,)}, ValueError, "betas must have 2 entries, got 1"),
        ("adam", {"lr": "fast"}, TypeError, "lr must be a number, got 'fast'"),
        ("sgd", {"nesterov": 1}, TypeError, "nesterov must be a bool, got 1"),
        (
            "adamw",
            {"momentum": 0.9},
            TypeError,
            "adamw got unknown hyperparameter(s) 'momentum'; valid: lr, betas, eps, weight_decay",
        ),
        ("adamx", {}, ValueError, "unknown algorithm 'adamx'; expected one of"),
    ],
)
def test_bad_hyperparameters_raise_exact_messages(algorithm, hparams, exc, message) -> None:
    with pytest.raises(exc) as info:
        create_optimizer(algorithm, backend="cpu", **hparams)
    assert str(info.value).startswith(message)


def test_hyperparameters_are_frozen_and_coerced() -> None:
    opt = create_optimizer("adamw", backend="cpu", lr=1, betas=[0.8, 0.9])
    hp = opt.hyperparams
    assert hp.lr == 1.0
    assert isinstance(hp.lr, float)
    assert hp.betas == (0.8, 0.9)
    with pytest.raises(AttributeError):
        hp.lr = 2.0  # type: ignore[misc]
    assert hp.to_dict() == {
        "lr": 1.0,
        "betas": [0.8, 0.9],
        "eps": 1e-8,
        "weight_decay": 0.01,
        "amsgrad": False,
        "maximize": False,
        "step_count": "global",
    }


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        create_optimizer("adamw", backend="tpu")


# -- convergence ---------------------------------------------------------------------------

CONVERGE = {
    "sgd": {"lr": 0.05, "momentum": 0.9},
    "adam": {"lr": 0.05},
    "adamw": {"lr": 0.05, "weight_decay": 0.0},
    "nadamw": {"lr": 0.05, "weight_decay": 0.0},
    "radam": {"lr": 0.05},
    "qhadamw": {"lr": 0.05},
    "lion": {"lr": 0.005},
}


@pytest.mark.parametrize("algorithm", ELEMENTWISE)
def test_converges_on_an_ill_conditioned_quadratic(algorithm: str) -> None:
    # f(x) = 0.5 * sum(c_i (x_i - 1)^2), curvatures spanning two decades.
    c = np.logspace(-1, 1, 64).astype(np.float32)
    x = np.zeros(64, np.float32)
    opt = create_optimizer(algorithm, backend="cpu", **CONVERGE[algorithm])
    f0 = float(0.5 * (c * (x - 1) ** 2).sum())
    for _ in range(600):
        opt.step("x", (64,), x, (c * (x - 1)).astype(np.float32))
        opt.end_iteration()
    assert float(0.5 * (c * (x - 1) ** 2).sum()) < 1e-3 * f0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: create_optimizer("sgd", lr=1e308), "beyond float32"),
        (lambda: create_optimizer("adamw", lr=3.5e38), "beyond float32"),
        (lambda: create_optimizer("lion", lr=0.1, weight_decay=1e300), "beyond float32"),
        (lambda: create_optimizer("sgd", lr=0.1).set_lr(1e308), "beyond float32"),
        (lambda: create_optimizer("sgd", lr=0.1).set_lr_scale("w", 1e308), "beyond float32"),
        (lambda: create_optimizer("sgd", lr=1e30).set_lr_scale("w", 1e10), "× lr_scale"),
    ],
)
def test_rates_beyond_float32_are_refused(call, match) -> None:
    """Each of these was accepted and one step turned the parameter into Inf or NaN."""
    with pytest.raises(ValueError, match=match):
        call()


def test_an_lr_that_would_overflow_with_a_set_scale_is_refused() -> None:
    opt = create_optimizer("sgd", lr=1e30)
    opt.set_lr_scale("w", 1e6)
    with pytest.raises(ValueError, match="× lr_scale"):
        opt.set_lr(1e33)
    assert opt.lr == 1e30  # nothing changed
    p = np.ones(2, np.float32)
    opt.step("w", (2,), p, np.full(2, 1e-38, np.float32))
    assert np.isfinite(p).all()
