"""``step_count="per_param"`` (torch.optim's counting) and ``maximize`` on every algorithm.

torch counts steps per parameter: one whose ``grad`` is None in an iteration does not
advance, and one that starts training later begins its bias correction at 1. With
``step_count="per_param"`` stepd does the same; the global step stays the default (the
rlx-optim contract).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from stepd.kernels import create_optimizer
from stepd.kernels.algorithms import ALGORITHMS

SHAPES = [(7,), (4, 5), (3,), (6, 2)]
STEPS = 60


def _masks(seed: int) -> np.ndarray:
    """Which parameter has a gradient in which iteration: random gaps, and the last one
    only from iteration 20 on (a layer unfrozen mid-run)."""
    mask = np.random.default_rng(seed).random((STEPS, len(SHAPES))) < 0.7
    mask[:20, -1] = False
    mask[:, 0] = True
    return mask


TORCH: list[tuple[str, dict[str, Any], Callable[..., torch.optim.Optimizer]]] = [
    (
        "adamw",
        {"lr": 1e-2, "weight_decay": 0.05},
        lambda p: torch.optim.AdamW(p, 1e-2, weight_decay=0.05),
    ),
    ("adam", {"lr": 1e-2, "amsgrad": True}, lambda p: torch.optim.Adam(p, 1e-2, amsgrad=True)),
    ("radam", {"lr": 1e-2}, lambda p: torch.optim.RAdam(p, 1e-2)),
    (
        "nadamw",
        {"lr": 1e-2, "weight_decay": 0.02, "momentum_decay": 4e-3},
        lambda p: torch.optim.NAdam(
            p, 1e-2, weight_decay=0.02, momentum_decay=4e-3, decoupled_weight_decay=True
        ),
    ),
]


def _run_torch(make: Callable, init: list[np.ndarray], grads: list, mask: np.ndarray) -> list:
    params = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in init]
    opt = make(params)
    history = []
    for k in range(STEPS):
        for i, p in enumerate(params):
            p.grad = torch.from_numpy(grads[k][i].copy()) if mask[k, i] else None
        opt.step()
        history.append([p.detach().numpy().copy() for p in params])
    return history


def _run_ours(algorithm: str, hp: dict, init: list, grads: list, mask: np.ndarray, **kw) -> list:
    opt = create_optimizer(algorithm, backend=kw.get("backend", "cpu"), **hp)
    params = [p.copy() for p in init]
    history = []
    for k in range(STEPS):
        items = [(f"p{i}", p.shape, p, grads[k][i]) for i, p in enumerate(params) if mask[k, i]]
        opt.step_batch(items)
        opt.end_iteration()
        history.append([p.copy() for p in params])
    return history


def _problem(seed: int) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(STEPS)]
    return init, grads


@pytest.mark.parametrize(("algorithm", "hp", "make"), TORCH, ids=[t[0] for t in TORCH])
def test_per_param_counting_equals_torch_with_missing_grads(algorithm, hp, make) -> None:
    init, grads = _problem(1)
    mask = _masks(2)
    theirs = _run_torch(make, init, grads, mask)
    ours = _run_ours(algorithm, {**hp, "step_count": "per_param"}, init, grads, mask)
    for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        for i in range(len(SHAPES)):
            np.testing.assert_allclose(
                a[i], b[i], rtol=1e-5, atol=1e-6, err_msg=f"p{i} at iteration {k + 1}"
            )
    # The global step (the default) is a different trajectory here: the test can tell.
    glob = _run_ours(algorithm, hp, init, grads, mask)
    assert max(np.abs(g - t).max() for g, t in zip(glob[-1], theirs[-1], strict=True)) > 1e-4


# Every algorithm, default hyperparameters (Sophia takes no Hessian here: its own tests do).
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_per_param_fused_cpu_equals_reference_bitwise(algorithm: str) -> None:
    init, grads = _problem(3)
    mask = _masks(4)
    hp = {"step_count": "per_param"}
    cpu = _run_ours(algorithm, hp, init, grads, mask, backend="cpu")
    ref = _run_ours(algorithm, hp, init, grads, mask, backend="reference")
    for k, (a, b) in enumerate(zip(cpu, ref, strict=True)):
        for i in range(len(SHAPES)):
            np.testing.assert_array_equal(a[i], b[i], err_msg=f"p{i} at iteration {k + 1}")


def test_per_param_counting_in_a_repeated_layout() -> None:
    """A repeated step_batch of the same arrays runs a prepared launch: with counts that
    differ per tensor, each tensor still gets its own step's scalars."""
    init, grads = _problem(5)
    late = np.ones((STEPS, len(SHAPES)), bool)
    late[:10, 1] = False  # p1 joins at iteration 11, then the layout repeats every step
    theirs = _run_torch(lambda p: torch.optim.AdamW(p, 1e-2), init, grads, late)
    ours = _run_ours("adamw", {"lr": 1e-2, "step_count": "per_param"}, init, grads, late)
    for i in range(len(SHAPES)):
        np.testing.assert_allclose(ours[-1][i], theirs[-1][i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_maximize_is_the_negated_gradient_bitwise(algorithm: str) -> None:
    """torch defines maximize as stepping on -grad (weight decay included); every stepd
    algorithm does exactly that, and leaves the caller's gradient alone."""
    init, grads = _problem(6)
    mask = np.ones((STEPS, len(SHAPES)), bool)
    kept = [[g.copy() for g in row] for row in grads]
    up = _run_ours(algorithm, {"maximize": True}, init, grads, mask)
    negated = [[-g for g in row] for row in grads]
    down = _run_ours(algorithm, {}, init, negated, mask)
    for i in range(len(SHAPES)):
        np.testing.assert_array_equal(up[-1][i], down[-1][i], err_msg=f"p{i}")
    for row, orig in zip(grads, kept, strict=True):
        for g, o in zip(row, orig, strict=True):
            np.testing.assert_array_equal(g, o)


def test_step_count_is_validated() -> None:
    with pytest.raises(ValueError, match="Invalid step_count value: 'param'"):
        create_optimizer("adamw", step_count="param")
    with pytest.raises(TypeError, match="maximize must be a bool"):
        create_optimizer("sgd", maximize=1)
