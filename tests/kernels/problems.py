"""Small training problems shared by the algorithms' convergence tests."""

from __future__ import annotations

from typing import Any

import numpy as np


def linear_regression_loss_ratio(opt: Any, lr: float, steps: int) -> float:
    """Fit W (4x8, a matrix) and b (4, a vector) to a random affine map from zero, with the lr
    decaying linearly to 0; returns final loss / initial loss."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    w_true = rng.standard_normal((4, 8)).astype(np.float32)
    b_true = rng.standard_normal(4).astype(np.float32)
    y = x @ w_true.T + b_true
    w, b = np.zeros((4, 8), np.float32), np.zeros(4, np.float32)

    def loss_and_grads() -> tuple[float, np.ndarray, np.ndarray]:
        r = x @ w.T + b - y
        return float(0.5 * (r * r).sum(1).mean()), r.T @ x / len(x), r.mean(0)

    first = loss_and_grads()[0]
    for i in range(steps):
        opt.set_lr(lr * (1 - i / steps))
        _, gw, gb = loss_and_grads()
        opt.step_batch([("w", w.shape, w, gw), ("b", b.shape, b, gb)])
        opt.end_iteration()
    return loss_and_grads()[0] / first


def assert_resume_bit_identical(algorithm: str, hparams: dict[str, Any]) -> None:
    """10 steps straight vs 4 steps, state_dict into a fresh default optimizer, 6 more: the
    params (a matrix, a vector, a scalar; one with an lr_scale) must agree bit for bit."""
    import copy

    from stepd.kernels import create_optimizer

    rng = np.random.default_rng(2)
    shapes = {"w": (6, 5), "b": (5,), "s": ()}
    init = {k: np.asarray(rng.standard_normal(s), np.float32) for k, s in shapes.items()}
    grads = [
        {k: np.asarray(rng.standard_normal(s), np.float32) for k, s in shapes.items()}
        for _ in range(10)
    ]

    def run(opt: Any, params: dict[str, np.ndarray], gs: list[dict[str, np.ndarray]]) -> None:
        for g in gs:
            opt.step_batch([(k, p.shape, p, g[k]) for k, p in params.items()])
            opt.end_iteration()

    straight = copy.deepcopy(init)
    a = create_optimizer(algorithm, **hparams)
    a.set_lr_scale("b", 0.5)
    run(a, straight, grads)

    resumed = copy.deepcopy(init)
    b = create_optimizer(algorithm, **hparams)
    b.set_lr_scale("b", 0.5)
    run(b, resumed, grads[:4])
    c = create_optimizer(algorithm)  # hyperparameters come back from the state_dict
    c.load_state_dict(copy.deepcopy(b.state_dict()))
    run(c, resumed, grads[4:])
    for k in init:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
    assert c.state_dict()["global_step"] == a.state_dict()["global_step"] == 10
