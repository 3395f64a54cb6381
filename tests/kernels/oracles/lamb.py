"""LAMB against ``optax.lamb`` (JAX on the CPU, float32), through a torch-style adapter.

optax computes its bias corrections in float32 (``1 - b**t`` with ``b`` rounded to float32:
``1 - 0.999f`` is off by 1.3e-5 relative) and its norms in float32; we take both in float64
(and fold ``lr * ratio`` into one scalar). The trust ratio normalises u, so most of that
cancels: over the table's 50 steps the largest absolute difference seen was 3e-7 on
parameters of order 1 (the bound is rtol 1e-5, atol 1e-6).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch

from . import ParityCase


def _jax() -> tuple[Any, Any, Any]:
    """jax, jax.numpy, optax: imported on first use, so the table loads without them."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jax.config.update("jax_platforms", "cpu")
    return jax, jax.numpy, optax


class OptaxAdapter:
    """Drives an optax transformation like a torch optimizer: ``step()`` reads ``p.grad``.

    ``params`` is a list of tensors or torch-style groups (``{"params": [...], "lr": x}``);
    each group gets its own optax state, and ``param_groups[i]["lr"]`` may be changed
    between steps (the transformation must be built by ``optax.inject_hyperparams``).
    """

    def __init__(self, make: Any, params: Sequence[Any], lr: float) -> None:
        jax, jnp, optax = _jax()
        self._jnp, self._optax = jnp, optax
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = [{"lr": lr, **g, "params": list(g["params"])} for g in groups]
        self._tx = make(lr)
        self._states = [
            self._tx.init([jnp.asarray(p.detach().numpy()) for p in g["params"]])
            for g in self.param_groups
        ]
        self._update = jax.jit(self._tx.update)

    def step(self) -> None:
        jnp, optax = self._jnp, self._optax
        for i, group in enumerate(self.param_groups):
            tensors = group["params"]
            params = [jnp.asarray(p.detach().numpy()) for p in tensors]
            grads = [jnp.asarray(p.grad.numpy()) for p in tensors]
            state = self._states[i]
            state.hyperparams["learning_rate"] = jnp.asarray(group["lr"], dtype=jnp.float32)
            updates, self._states[i] = self._update(grads, state, params)
            for p, new in zip(tensors, optax.apply_updates(params, updates), strict=True):
                with torch.no_grad():
                    p.copy_(torch.from_numpy(np.array(new)))


def optax_lamb(
    params: Sequence[Any],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
) -> OptaxAdapter:
    def make(lr: float) -> Any:
        optax = _jax()[2]
        return optax.inject_hyperparams(optax.lamb)(
            learning_rate=lr, b1=betas[0], b2=betas[1], eps=eps, weight_decay=weight_decay
        )

    return OptaxAdapter(make, params, lr)


CASES = [
    ParityCase("lamb", "lamb", {"lr": 1e-2}, lambda p: optax_lamb(p, lr=1e-2)),
    ParityCase(
        "lamb-wd",
        "lamb",
        {"lr": 5e-3, "betas": (0.8, 0.99), "eps": 1e-4, "weight_decay": 0.1},
        lambda p: optax_lamb(p, lr=5e-3, betas=(0.8, 0.99), eps=1e-4, weight_decay=0.1),
    ),
    ParityCase(
        "lamb-lr-schedule-and-scales",
        "lamb",
        {"lr": 2e-2, "weight_decay": 0.01},
        lambda p: optax_lamb(
            [{"params": p[:2], "lr": 2e-2 * 0.5}, {"params": p[2:]}], lr=2e-2, weight_decay=0.01
        ),
        shapes=((7,), (4, 4), (9,), (2, 3)),
        lr_scales={0: 0.5, 1: 0.5},
        lr_at=lambda i: 2e-2 * (1.0 - i / 100),
    ),
]
