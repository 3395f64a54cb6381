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
