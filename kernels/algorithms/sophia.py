r"""Sophia-H: clipped second-order steps with a Hessian-diagonal estimate (Liu et al. 2023,
2305.14342), in pytorch-optimizer ``SophiaH``'s formulation, the estimate supplied by the caller.

The caller computes a Hessian-diagonal estimate ``\hat h`` (Hutchinson: ``z * (H z)`` with
``z`` Gaussian or Rademacher, or Gauss–Newton–Bartlett) every ``k`` steps (the paper's and
SophiaH's ``update_period``, default 10) and passes it with
:meth:`stepd.kernels.optimizer.Optimizer.update_hessian` before that step:

.. math::
    h &\leftarrow h + (1 - \beta_2)(\hat h - h)
        \qquad \text{(only when } \hat h \text{ is supplied)} \\
    \theta &\leftarrow \theta (1 - \eta \lambda) \\
    m &\leftarrow m + (1 - \beta_1)(g - m) \\
    \theta &\leftarrow \theta - \eta\, \mathrm{clip}\!\Big(\frac{m}{\max(h, \epsilon)},
        -\rho, \rho\Big)

This is SophiaH's exact formula (its ``p`` is our ``rho``). The paper writes the step as
``\eta' \mathrm{clip}(m / \max(\gamma h, \epsilon'), 1)``; the two are the same update with
``\eta' = \eta \rho``, ``\gamma = \rho``, ``\epsilon' = \rho \epsilon`` (clipping to
``[-\rho, \rho]`` and scaling by ``\eta`` equals clipping ``m / (\rho h)`` to ``[-1, 1]`` and
scaling by ``\eta \rho``). No bias correction, as in both. Entries where ``h <= \epsilon``
(before the first estimate, or where the estimate is negative) take the clipped step
``\pm \eta \rho``, i.e. sign descent. The weight decay is decoupled (SophiaH's default).

Steps follow rlx-optim: ``update_hessian`` at iteration ``t`` folds ``\hat h`` into ``h``
right away, and the ``step`` of the same iteration uses it — SophiaH's ``step(hessian=...)``.
How often to supply an estimate is the caller's choice (no ``update_period`` here).

Slots ``exp_avg`` (m) and ``hessian`` (h), param-shaped. Both the step (op ``sophia``) and
the Hessian EMA (op ``sophia_hessian``, which steps the ``hessian`` slot in the param
position with ``\hat h`` in the grad position) are fused ops (``csrc/sophia.cuh``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..hyperparams import Hyperparams, check_betas, check_eps, check_lr, check_weight_decay
from ..ops import Launch, Op
from .base import Algorithm, StepItem


def _reference(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    m, h = slots
    p *= a.decay
    m += a.one_minus_beta1 * (g - m)
    d = np.where(h < a.eps, a.eps, h)  # as the C++: a NaN in h propagates
    u = m / d
    u = np.where(u < a.neg_rho, a.neg_rho, u)
    u = np.where(u > a.rho, a.rho, u)
    p += a.neg_lr * u


def _reference_hessian(h: np.ndarray, hhat: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    h += a.one_minus_beta2 * (hhat - h)


SOPHIA = Op(
    "sophia",
    ("exp_avg", "hessian"),
    ("decay", "one_minus_beta1", "neg_lr", "rho", "neg_rho", "eps"),
    _reference,
)
# `param` of a SOPHIA_HESSIAN launch is the `hessian` slot, `grad` the caller's estimate.
SOPHIA_HESSIAN = Op("sophia_hessian", (), ("one_minus_beta2",), _reference_hessian)


@dataclass(frozen=True)
class SophiaHyperparams(Hyperparams):
    algorithm = "sophia"
    lr: float = 6e-2
    betas: tuple[float, float] = (0.96, 0.99)
    rho: float = 1e-2
    eps: float = 1e-12
    weight_decay: float = 0.0

    def validate(self) -> None:
        check_lr(self.lr)
        check_betas(self.betas)
        if not (math.isfinite(self.rho) and self.rho >= 0.0):
            raise ValueError(f"Invalid rho value: {self.rho}")
        check_eps(self.eps)
        check_weight_decay(self.weight_decay)


class Sophia(Algorithm):
    name = "sophia"
    hyperparams = SophiaHyperparams
    hp: SophiaHyperparams
    takes_hessian = True

    def slot_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {slot: shape for slot in SOPHIA.slots}

    def step(self, backend: Any, items: Sequence[StepItem], t: int) -> None:
        hp = self.hp
        rows: dict[float, np.ndarray] = {}
        launches = []
        for it in items:
            if it.lr not in rows:
                rows[it.lr] = SOPHIA.pack(
                    {
                        "decay": 1.0 - it.lr * hp.weight_decay,
                        "one_minus_beta1": 1.0 - hp.betas[0],
                        "neg_lr": -it.lr,
                        "rho": hp.rho,
                        "neg_rho": -hp.rho,
                        "eps": hp.eps,
                    }
                )
            # Flat views: items may be flat while slots are shaped (the NumPy reference
            # would not broadcast them); contiguous, so written through in place.
            slots = [it.slots[s].reshape(-1) for s in SOPHIA.slots]
            launches.append(Launch(it.param.reshape(-1), it.grad.reshape(-1), slots, rows[it.lr]))
        backend.launch(SOPHIA, launches)

    def update_hessian(self, backend: Any, item: StepItem, hessian: Any, t: int) -> None:
        args = SOPHIA_HESSIAN.pack({"one_minus_beta2": 1.0 - self.hp.betas[1]})
        h = item.slots["hessian"].reshape(-1)
        backend.launch(SOPHIA_HESSIAN, [Launch(h, hessian.reshape(-1), [], args)])
