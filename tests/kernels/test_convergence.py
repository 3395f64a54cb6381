"""Every algorithm converges: on Rosenbrock, and on a small MLP classifying scikit-learn's
bundled digits. Thresholds are stated per problem; hyperparameters are what a user would
start from (the elementwise family's torch defaults, the matrix-aware ones' papers).
"""

from __future__ import annotations

import numpy as np
import pytest
from stepd.kernels import ALGORITHMS, create_optimizer

# One entry per algorithm of the registry in each table (test_registry.py checks both ways).

# Rosenbrock: 16 independent problems as one (16, 2) parameter, so the matrix-aware
# algorithms see a matrix. f = mean((1 - x)^2 + 100 (y - x^2)^2), minimum 0 at (1, 1).
ROSENBROCK: dict[str, tuple[dict, int]] = {  # algorithm -> (hparams, steps)
    "sgd": ({"lr": 1.5e-3, "momentum": 0.98, "nesterov": True}, 4000),
    "adafactor": ({"lr": 5e-2, "beta1": 0.9}, 2000),  # lr: the relative step's cap
    "adam": ({"lr": 5e-2, "betas": (0.9, 0.99)}, 2000),
    "adamw": ({"lr": 5e-2, "betas": (0.9, 0.99), "weight_decay": 0.0}, 2000),
    "nadamw": ({"lr": 5e-2, "betas": (0.9, 0.99), "weight_decay": 0.0}, 2000),
    "radam": ({"lr": 2e-2, "betas": (0.9, 0.99)}, 2000),
    "qhadamw": ({"lr": 5e-2, "betas": (0.9, 0.99)}, 2000),
    "lion": ({"lr": 1e-2}, 2000),
    "muon": ({"lr": 2e-2, "weight_decay": 0.0}, 2000),  # (16, 2): one tall matrix
    "lamb": ({"lr": 2e-2, "betas": (0.9, 0.99)}, 2000),
    "mars": ({"lr": 2e-2}, 2000),
    "kron": ({"lr": 3e-2}, 2000),  # (16, 2): a 16 x 16 and a 2 x 2 factor
    # lr = 1: the unclipped step m / h is Newton's; rho caps it per coordinate.
    "sophia": ({"lr": 1.0, "rho": 0.05}, 2000),
    "soap": ({"lr": 2e-2, "weight_decay": 0.0}, 2000),
    "adamw8bit": ({"lr": 5e-2, "betas": (0.9, 0.99), "weight_decay": 0.0}, 2000),
    "lion8bit": ({"lr": 1e-2}, 2000),
    "sgd8bit": ({"lr": 1.5e-3, "momentum": 0.98, "nesterov": True}, 4000),
}
ROSENBROCK_LOSS = 1e-3

DIGITS: dict[str, dict] = {  # algorithm -> hparams, 300 full-batch steps
    "sgd": {"lr": 0.1, "momentum": 0.9},
    "adafactor": {"lr": 5e-2, "beta1": 0.9},
    "adam": {"lr": 1e-2},
    "adamw": {"lr": 1e-2},
    "nadamw": {"lr": 1e-2},
    "radam": {"lr": 3e-2},  # its first steps are un-adapted SGD steps of size lr
    "qhadamw": {"lr": 1e-2, "betas": (0.9, 0.999)},
    "lion": {"lr": 5e-3},
    "muon": {"lr": 2e-2, "adamw_lr": 1e-2},  # w1, w2 by Muon; b1, b2 by its AdamW fallback
    "lamb": {"lr": 1e-2},
    "mars": {"lr": 1e-2, "lr_1d": 1e-2},  # biases: AdamW with lr_1d
    "kron": {"lr": 1e-2},  # biases: clipped momentum SGD
    "sophia": {"lr": 0.3, "rho": 0.05},
    "soap": {"lr": 1e-2},
    "adamw8bit": {"lr": 1e-2},
    "lion8bit": {"lr": 5e-3},
    "sgd8bit": {"lr": 0.1, "momentum": 0.9},
}
DIGITS_LOSS = 0.15  # train cross-entropy (it starts at ~2.3); held-out accuracy >= 90 %


def _cosine(base: float, step: int, steps: int) -> float:
    return base * 0.5 * (1 + np.cos(np.pi * step / steps))


def _rosenbrock(p: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    x, y = p[:, 0].astype(np.float64), p[:, 1].astype(np.float64)
    n = p.shape[0]
    f = ((1 - x) ** 2 + 100 * (y - x**2) ** 2).mean()
    g = np.stack([-2 * (1 - x) - 400 * x * (y - x**2), 200 * (y - x**2)], axis=1) / n
    h = np.stack([2 - 400 * (y - x**2) + 800 * x**2, np.full_like(y, 200.0)], axis=1) / n
    return float(f), g.astype(np.float32), h.astype(np.float32)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_rosenbrock(algorithm: str) -> None:
    hparams, steps = ROSENBROCK[algorithm]
    rng = np.random.default_rng(0)
    p = (np.array([-1.2, 1.0]) + rng.uniform(-0.3, 0.3, (16, 2))).astype(np.float32)
    opt = create_optimizer(algorithm, backend="cpu", **hparams)
    f0 = _rosenbrock(p)[0]
    for step in range(steps):
        f, g, h = _rosenbrock(p)
        if ALGORITHMS[algorithm].takes_hessian and step % 10 == 0:
            opt.update_hessian("xy", p.shape, np.abs(h))
        opt.set_lr(_cosine(hparams["lr"], step, steps))
        opt.step("xy", p.shape, p, g)
        opt.end_iteration()
    f = _rosenbrock(p)[0]
    assert f < ROSENBROCK_LOSS, f"{algorithm}: Rosenbrock {f0:.3g} -> {f:.3g}"


def _digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _mlp_loss_grads(params: dict, x: np.ndarray, y: np.ndarray) -> tuple[float, dict, float]:
    h_pre = x @ params["w1"] + params["b1"]
    h = np.maximum(h_pre, 0)
    logits = h @ params["w2"] + params["b2"]
    logits = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(-np.log(probs[np.arange(n), y] + 1e-12).mean())
    acc = float((probs.argmax(axis=1) == y).mean())
    d = probs
    d[np.arange(n), y] -= 1
    d /= n
    dh = (d @ params["w2"].T) * (h_pre > 0)
    grads = {"w2": h.T @ d, "b2": d.sum(0), "w1": x.T @ dh, "b1": dh.sum(0)}
    return loss, {k: np.ascontiguousarray(v, np.float32) for k, v in grads.items()}, acc


def _hutchinson(params: dict, x, y, rng, eps: float = 1e-3) -> dict:
    """Hessian-diagonal estimate z * (H z), H z by central differences of the gradient."""
    z = {k: rng.choice([-1.0, 1.0], v.shape).astype(np.float32) for k, v in params.items()}
    plus = _mlp_loss_grads({k: v + eps * z[k] for k, v in params.items()}, x, y)[1]
    minus = _mlp_loss_grads({k: v - eps * z[k] for k, v in params.items()}, x, y)[1]
    return {k: (z[k] * (plus[k] - minus[k]) / (2 * eps)).astype(np.float32) for k in params}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_digits_mlp(algorithm: str) -> None:
    x, y, x_test, y_test = _digits()
    rng = np.random.default_rng(1)
    params = {
        "w1": (rng.standard_normal((64, 32)) * np.sqrt(2 / 64)).astype(np.float32),
        "b1": np.zeros(32, np.float32),
        "w2": (rng.standard_normal((32, 10)) * np.sqrt(2 / 32)).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }
    hparams = DIGITS[algorithm]
    opt = create_optimizer(algorithm, backend="cpu", **hparams)
    steps = 300
    for step in range(steps):
        _, grads, _ = _mlp_loss_grads(params, x, y)
        if ALGORITHMS[algorithm].takes_hessian and step % 10 == 0:
            for k, h in _hutchinson(params, x, y, rng).items():
                opt.update_hessian(k, params[k].shape, h)
        opt.set_lr(_cosine(hparams["lr"], step, steps))
        opt.step_batch([(k, p.shape, p, grads[k]) for k, p in params.items()])
        opt.end_iteration()
    loss, _, _ = _mlp_loss_grads(params, x, y)
    test_acc = _mlp_loss_grads(params, x_test, y_test)[2]
    assert loss < DIGITS_LOSS, f"{algorithm}: train loss {loss:.3f}"
    assert test_acc >= 0.9, f"{algorithm}: held-out accuracy {test_acc:.3f}"
