"""``stepd tour``: a two-layer classifier on a synthetic spiral, trained with each optimizer.

Everything runs in process through ``stepd.kernels.create_optimizer``: the model keeps its
parameters, the optimizer gets ``step(name, shape, param, grad)`` calls, exactly what a
stepd client sends to a server. With ``--backend cuda`` the parameters live on the device
(CuPy arrays, the CUDA backend's contract): the forward and backward pass run on a host copy
and the gradients are uploaded, as a training loop that keeps its model on the host would.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from stepd.kernels import ALGORITHMS, create_optimizer, global_grad_clip_scale

# One sensible configuration per algorithm of the registry (ALGORITHMS, whose order the tour
# follows), as a user would start; tests/kernels/test_registry.py checks it covers them all.
CONFIGS: dict[str, dict] = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    "adam": {"lr": 1e-2},
    "adamw": {"lr": 1e-2, "weight_decay": 1e-4},
    "nadamw": {"lr": 1e-2, "weight_decay": 1e-4},
    "radam": {"lr": 3e-2},
    "qhadamw": {"lr": 1e-2, "betas": (0.9, 0.999)},
    "lion": {"lr": 3e-3, "weight_decay": 1e-3},
    "lamb": {"lr": 3e-2},
    "adafactor": {"lr": 5e-2, "beta1": 0.9},
    "muon": {"lr": 2e-2, "adamw_lr": 1e-2},  # matrices by Muon, biases by its AdamW
    "soap": {"lr": 1e-2},
    "kron": {"lr": 1e-2},
    "sophia": {"lr": 0.3, "rho": 0.05},  # fed a Hutchinson Hessian estimate every 10 steps
    "mars": {"lr": 1e-2, "lr_1d": 1e-2},
    "adamw8bit": {"lr": 1e-2, "weight_decay": 1e-4},  # 8-bit blockwise-quantized moments
    "lion8bit": {"lr": 3e-3, "weight_decay": 1e-3},
    "sgd8bit": {"lr": 0.1, "momentum": 0.9, "nesterov": True},
}


def spiral(n_per_class: int, classes: int, rng: np.random.Generator) -> tuple:
    r = np.tile(np.linspace(0.05, 1.0, n_per_class), classes)
    k = np.repeat(np.arange(classes), n_per_class)
    theta = k * 2 * np.pi / classes + r * 4.0 + rng.normal(0, 0.15, r.size)
    x = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1).astype(np.float32)
    return x, k


def init_params(rng: np.random.Generator, hidden: int, classes: int) -> dict[str, np.ndarray]:
    def he(fan_in: int, shape: tuple) -> np.ndarray:
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return {
        "fc1.weight": he(2, (2, hidden)),
        "fc1.bias": np.zeros(hidden, np.float32),
        "fc2.weight": he(hidden, (hidden, classes)),
        "fc2.bias": np.zeros(classes, np.float32),
    }


def loss_and_grads(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> tuple:
    h_pre = x @ p["fc1.weight"] + p["fc1.bias"]
    h = np.maximum(h_pre, 0)
    logits = h @ p["fc2.weight"] + p["fc2.bias"]
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    n = x.shape[0]
    loss = float(-np.log(probs[np.arange(n), y] + 1e-12).mean())
    d_logits = probs
    d_logits[np.arange(n), y] -= 1
    d_logits /= n
    d_h = (d_logits @ p["fc2.weight"].T) * (h_pre > 0)
    grads = {
        "fc2.weight": h.T @ d_logits,
        "fc2.bias": d_logits.sum(axis=0),
        "fc1.weight": x.T @ d_h,
        "fc1.bias": d_h.sum(axis=0),
    }
    accuracy = float((logits.argmax(axis=1) == y).mean())
    return loss, accuracy, {k: np.ascontiguousarray(v, np.float32) for k, v in grads.items()}


def hutchinson(p: dict, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> dict:
    """Hessian-diagonal estimate z * (H z), H z by central differences of the gradient."""
    eps = 1e-3
    z = {k: rng.choice(np.array([-1, 1], np.float32), v.shape) for k, v in p.items()}
    plus = loss_and_grads({k: v + eps * z[k] for k, v in p.items()}, x, y)[2]
    minus = loss_and_grads({k: v - eps * z[k] for k, v in p.items()}, x, y)[2]
    return {k: (z[k] * (plus[k] - minus[k]) / (2 * eps)).astype(np.float32) for k in p}


def train(algorithm: str, steps: int, backend: str, seed: int) -> tuple[float, float, float, float]:
    """The loss before the first step and after the last, the accuracy, the seconds taken."""
    if steps < 1:
        raise ValueError(f"the tour needs at least one training step, got {steps}")
    rng = np.random.default_rng(seed)
    x, y = spiral(200, 3, rng)
    params = init_params(rng, hidden=64, classes=3)
    opt = create_optimizer(algorithm, backend=backend, **CONFIGS[algorithm])
    xp = opt.backend.xp  # numpy, or cupy: where the optimizer takes its arrays
    device: dict[str, Any] = (
        {k: xp.asarray(v) for k, v in params.items()} if xp is not np else params
    )
    base_lr = opt.lr
    first: float | None = None
    start = time.perf_counter()
    for step in range(steps):
        loss, acc, grads = loss_and_grads(params, x, y)
        first = loss if first is None else first
        if ALGORITHMS[algorithm].takes_hessian and step % 10 == 0:
            for name, h in hutchinson(params, x, y, rng).items():
                opt.update_hessian(name, params[name].shape, xp.asarray(h))
        scale = global_grad_clip_scale(grads.values(), max_norm=5.0)
        opt.set_lr(base_lr * min(1.0, (step + 1) / 20))  # warm-up
        opt.step_batch(
            [
                (name, p.shape, p, xp.asarray(grads[name] * np.float32(scale)))
                for name, p in device.items()
            ]
        )
        opt.end_iteration()
        if device is not params:  # the host copy the next pass runs on
            params = {k: v.get() for k, v in device.items()}
    loss, acc, _ = loss_and_grads(params, x, y)
    assert first is not None  # steps >= 1
    return first, loss, acc, time.perf_counter() - start


def run_tour(steps: int = 300, backend: str = "auto", seed: int = 0) -> int:
    print(f"stepd tour: 2-64-3 MLP on a 3-arm spiral (600 points), {steps} steps per optimizer")
    print(f"{'algorithm':<10} {'loss start':>10} {'loss end':>9} {'accuracy':>9} {'time':>7}")
    worst = 1.0
    for algorithm in ALGORITHMS:
        first, last, acc, secs = train(algorithm, steps, backend, seed)
        worst = min(worst, acc)
        print(f"{algorithm:<10} {first:>10.4f} {last:>9.4f} {acc:>8.1%} {secs:>6.2f}s")
    print(
        "Each training step hands all four tensors to the optimizer in one step_batch call; "
        "the elementwise work runs in fused kernels."
    )
    return 0 if worst > 0.5 else 1
