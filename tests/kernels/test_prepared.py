"""Prepared step_batch layouts: a repeated (names, shapes, param arrays) layout reuses its
pointer table. The results must be those of the unprepared path, bit for bit, and every
change that could make a kept table stale must be noticed."""

from __future__ import annotations

import array
import copy
import gc

import numpy as np
import pytest
from stepd.kernels import create_optimizer
from stepd.kernels import optimizer as optimizer_module
from stepd.kernels.algorithms import ALGORITHMS, ElementwiseAlgorithm
from stepd.kernels.optimizer import MAX_PLANS

ELEMENTWISE = sorted(n for n, c in ALGORITHMS.items() if issubclass(c, ElementwiseAlgorithm))
HP = {"sgd": {"lr": 0.05, "momentum": 0.9}}
SHAPES = {"a": (3, 5), "b": (7,), "c": (2, 2, 2)}


def _params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _grads(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _batch(params, grads) -> list:
    return [(k, SHAPES[k], params[k], grads[k]) for k in SHAPES]


@pytest.mark.parametrize("algorithm", ELEMENTWISE)
def test_prepared_layouts_match_the_reference_bit_for_bit(algorithm: str) -> None:
    """Mixed lr_scales, set_lr and set_lr_scale mid-run, end_iteration: fused (prepared
    from the second step on) against the NumPy reference (never prepared)."""
    fused = create_optimizer(algorithm, backend="cpu", **HP.get(algorithm, {}))
    ref = create_optimizer(algorithm, backend="reference", **HP.get(algorithm, {}))
    pf, pr = _params(), _params()
    rng = np.random.default_rng(1)
    for opt in (fused, ref):
        opt.set_lr_scale("b", 0.5)
    for step in range(12):
        grads = _grads(rng)
        if step == 5:
            for opt in (fused, ref):
                opt.set_lr(opt.lr * 0.3)
                opt.set_lr_scale("c", 2.0)
        fused.step_batch(_batch(pf, grads))
        ref.step_batch(_batch(pr, grads))
        if step % 3 == 2:
            fused.end_iteration()
            ref.end_iteration()
        if step >= 1 and step != 5:
            assert fused._plans, "a repeated layout should be prepared"
        for k in SHAPES:
            np.testing.assert_array_equal(pf[k], pr[k], err_msg=f"{k} at step {step}")


def test_a_new_param_array_for_a_name_is_not_stepped_through_a_stale_table() -> None:
    fused = create_optimizer("adamw", backend="cpu")
    ref = create_optimizer("adamw", backend="reference")
    pf, pr = _params(), _params()
    rng = np.random.default_rng(2)
    for _ in range(3):
        g = _grads(rng)
        fused.step_batch(_batch(pf, g))
        ref.step_batch(_batch(pr, g))
    pf = {k: v.copy() for k, v in pf.items()}  # same values, new arrays: the old are stale
    old = {k: v.copy() for k, v in pf.items()}
    for _ in range(3):
        g = _grads(rng)
        fused.step_batch(_batch(pf, g))
        ref.step_batch(_batch(pr, g))
    for k in SHAPES:
        assert not np.array_equal(pf[k], old[k])
        np.testing.assert_array_equal(pf[k], pr[k])


def test_load_state_dict_drops_the_prepared_tables() -> None:
    a = create_optimizer("adamw", backend="cpu")
    p = _params()
    rng = np.random.default_rng(3)
    for _ in range(4):
        a.step_batch(_batch(p, _grads(rng)))
    saved, saved_p = copy.deepcopy(a.state_dict()), {k: v.copy() for k, v in p.items()}
    for _ in range(3):  # move on, then go back
        a.step_batch(_batch(p, _grads(rng)))
    a.load_state_dict(saved)
    assert not a._plans
    b = create_optimizer("adamw", backend="cpu")
    b.load_state_dict(saved)
    for k in SHAPES:
        p[k][...] = saved_p[k]
    q = {k: v.copy() for k, v in saved_p.items()}
    for _ in range(3):
        g = _grads(rng)
        a.step_batch(_batch(p, g))
        b.step_batch(_batch(q, g))
    for k in SHAPES:
        np.testing.assert_array_equal(p[k], q[k])


BAD = [
    ("short grad", lambda g: np.ones(14, np.float32), ValueError, "has 14 elements"),
    ("float64 grad", lambda g: g.astype(np.float64), TypeError, "grad must be float32"),
    ("strided grad", lambda g: np.repeat(g, 2, axis=1)[:, ::2], ValueError, "C-contiguous"),
    ("list grad", lambda g: g.tolist(), TypeError, "grad must be a numpy.ndarray"),
    # float32 buffers that are not float32 ndarrays: the C check of a bound layout refuses
    # them as the Python one does
    ("array grad", lambda g: array.array("f", g.ravel()), TypeError, "numpy.ndarray"),
    ("byte-swapped grad", lambda g: g.astype(">f4"), TypeError, "grad must be float32"),
]


@pytest.mark.parametrize(("make", "exc", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_on_a_prepared_layout_changes_nothing(make, exc, match) -> None:
    opt = create_optimizer("adamw", backend="cpu")
    p = _params()
    rng = np.random.default_rng(4)
    for _ in range(3):
        opt.step_batch(_batch(p, _grads(rng)))
    assert opt._plans
    before, p_before = copy.deepcopy(opt.state_dict()), {k: v.copy() for k, v in p.items()}
    grads = _grads(rng)
    grads["a"] = make(grads["a"])
    with pytest.raises(exc, match=match):
        opt.step_batch(_batch(p, grads))
    after = opt.state_dict()
    for name, st in before["state"].items():
        assert after["state"][name]["count"] == st["count"]
        for slot, arr in st["slots"].items():
            np.testing.assert_array_equal(after["state"][name]["slots"][slot], arr)
    for k in SHAPES:
        np.testing.assert_array_equal(p[k], p_before[k])


def test_read_only_or_reshaped_params_leave_the_prepared_path() -> None:
    opt = create_optimizer("adamw", backend="cpu")
    p = _params()
    rng = np.random.default_rng(5)
    for _ in range(3):
        opt.step_batch(_batch(p, _grads(rng)))
    p["a"].flags.writeable = False
    with pytest.raises(ValueError, match="must be writable"):
        opt.step_batch(_batch(p, _grads(rng)))
    p["a"].flags.writeable = True
    batch = _batch(p, _grads(rng))
    batch[0] = ("a", (5, 3), p["a"], batch[0][3])
    with pytest.raises(ValueError, match="differs from its registered"):
        opt.step_batch(batch)


def test_prepared_layouts_are_bounded(monkeypatch) -> None:
    assert MAX_PLANS >= 1024  # one per name for a loop of single steps over a large model
    monkeypatch.setattr(optimizer_module, "MAX_PLANS", 8)
    opt = create_optimizer("sgd", backend="cpu", lr=0.1)
    arrays = [(np.ones(4, np.float32), np.ones(4, np.float32)) for _ in range(8 + 5)]
    for _ in range(2):
        for i, (p, g) in enumerate(arrays):
            opt.step_batch([(f"w{i}", (4,), p, g)])
    assert len(opt._plans) == 8


def test_threads_stepping_disjoint_names_of_one_optimizer(monkeypatch) -> None:
    """A server steps different parameters of one optimizer from several threads (their
    own locks serialise each name): with more layouts than MAX_PLANS, tables are built and
    evicted concurrently (the cap lowered to 8), and every name still ends where a serial
    run puts it."""
    import threading

    monkeypatch.setattr(optimizer_module, "MAX_PLANS", 8)
    count, steps = 32, 30
    fused = create_optimizer("adamw", backend="cpu")
    ref = create_optimizer("adamw", backend="reference")
    rng = np.random.default_rng(6)
    grads = [rng.standard_normal((steps, 64)).astype(np.float32) for _ in range(count)]
    pf = [np.ones(64, np.float32) for _ in range(count)]
    pr = [np.ones(64, np.float32) for _ in range(count)]
    errors: list[BaseException] = []

    def work(ids: range) -> None:
        try:
            for s in range(steps):
                for i in ids:
                    fused.step(f"w{i}", (64,), pf[i], grads[i][s])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(range(k, count, 4),)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for s in range(steps):
        for i in range(count):
            ref.step(f"w{i}", (64,), pr[i], grads[i][s])
    for i in range(count):
        np.testing.assert_array_equal(pf[i], pr[i])


def test_a_prepared_layout_does_not_keep_its_params_alive() -> None:
    import gc
    import weakref

    opt = create_optimizer("adamw", backend="cpu")
    p = np.ones(1000, np.float32)
    for _ in range(3):
        opt.step("w", (1000,), p, np.ones(1000, np.float32))
    assert opt._plans
    gone = weakref.ref(p)
    del p
    gc.collect()
    assert gone() is None
    q = np.ones(1000, np.float32)  # a new array for the name: stepped through a new table
    ref = create_optimizer("adamw", backend="reference")
    r = np.ones(1000, np.float32)
    for _ in range(3):
        ref.step("w", (1000,), r, np.ones(1000, np.float32))
    r[...] = 1.0
    for k in range(2):
        g = np.full(1000, 0.5 + k, np.float32)
        opt.step("w", (1000,), q, g)
        ref.step("w", (1000,), r, g)
    np.testing.assert_array_equal(q, r)


def test_a_none_param_after_the_prepared_array_is_gone_is_refused_as_bad_input() -> None:
    """The layout's array is dead and the caller passes None for it: the checked path
    says what is wrong (the identity test once let None through to ``.flags``)."""
    import gc

    opt = create_optimizer("adamw", backend="cpu")
    p = np.ones(8, np.float32)
    for _ in range(3):
        opt.step("w", (8,), p, np.ones(8, np.float32))
    assert opt._plans
    del p
    gc.collect()
    with pytest.raises(TypeError, match=r"param must be a numpy\.ndarray"):
        opt.step("w", (8,), None, np.ones(8, np.float32))


class Sub(np.ndarray):
    pass


def test_bound_layouts_step_exactly_as_the_python_checks_do() -> None:
    """A prepared layout checks its items and takes the gradients' addresses in C
    (csrc/bind.cpp) where that is built: the same results, bit for bit, as the Python path
    (list items too), and a layout whose param died is never bound by a reused id."""
    bound, plain = create_optimizer("adamw", backend="cpu"), create_optimizer("adamw")
    pb, pp = _params(), _params()
    rng = np.random.default_rng(7)
    for step in range(6):
        g = _grads(rng)
        batch = _batch(pb, g)
        if step % 2:
            batch = [list(item) for item in batch]
        bound.step_batch(batch)
        for plan in plain._plans.values():
            plan.launch._binder = None  # the Python loop
        plain.step_batch(_batch(pp, g))
    for k in SHAPES:
        np.testing.assert_array_equal(pb[k], pp[k])
    (plan,) = bound._plans.values()
    if plan.launch._binder is None:
        pytest.skip("csrc/bind.cpp could not be built here (no compiler or Python.h)")
    assert plan.launch.bind(_batch(pb, _grads(rng)), plan.shapes)
    assert not plan.launch.bind(_batch(pb, _grads(rng))[::-1], plan.shapes)
    # what C leaves to Python (a subclass's buffer may run Python code) still steps right
    g = _grads(rng)
    odd = {k: v.view(Sub) for k, v in g.items()}
    assert not plan.launch.bind(_batch(pb, odd), plan.shapes)
    bound.step_batch(_batch(pb, odd))
    plain.step_batch(_batch(pp, g))
    for k in SHAPES:
        np.testing.assert_array_equal(pb[k], pp[k])
    assert not plan.dead
    del pb["b"], batch
    gc.collect()
    assert plan.dead  # its id may now be another array's: the Python checks decide
    pb["b"] = np.zeros(7, np.float32)
    bound.step_batch(_batch(pb, _grads(rng)))
    assert bound._plans[tuple(SHAPES)] is not plan
