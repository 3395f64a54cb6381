r"""QHAdamW: quasi-hyperbolic Adam (Ma & Yarats 2019) with decoupled weight decay.

.. math::
    \theta &\leftarrow \theta (1 - \eta \lambda) \\
    m &\leftarrow m + (1 - \beta_1)(g - m), \quad v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
    \theta &\leftarrow \theta - \eta
      \frac{(1 - \nu_1) g + \nu_1 m / (1 - \beta_1^t)}
           {\sqrt{(1 - \nu_2) g^2 + \nu_2 v / (1 - \beta_2^t)} + \epsilon}

Defaults are the authors' QHAdamW recommendation (β = (0.995, 0.999), ν = (0.7, 1.0));
ν = (1, 1) is AdamW with ε outside the bias correction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..hyperparams import (
    Hyperparams,
    check_betas,
    check_eps,
    check_lr,
    check_unit_interval,
    check_weight_decay,
)
from ..ops import Op
from .base import ElementwiseAlgorithm


def _reference(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    m, v = slots
    p *= a.decay
    m += a.one_minus_beta1 * (g - m)
    v[...] = v * a.beta2 + a.one_minus_beta2 * g * g
    num = a.one_minus_nu1 * g + a.nu1 * (m / a.bias_correction1)
    den = np.sqrt(a.one_minus_nu2 * (g * g) + a.nu2 * (v / a.bias_correction2)) + a.eps
    p += a.neg_lr * (num / den)


QHADAMW = Op(
    "qhadamw",
    ("exp_avg", "exp_avg_sq"),
    (
        "decay",
        "one_minus_beta1",
        "beta2",
        "one_minus_beta2",
        "bias_correction1",
        "bias_correction2",
        "nu1",
        "one_minus_nu1",
        "nu2",
        "one_minus_nu2",
        "neg_lr",
        "eps",
    ),
    _reference,
)


@dataclass(frozen=True)
class QHAdamWHyperparams(Hyperparams):
    algorithm = "qhadamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.995, 0.999)
    nus: tuple[float, float] = (0.7, 1.0)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def validate(self) -> None:
        check_lr(self.lr)
        check_betas(self.betas)
        for i, nu in enumerate(self.nus):
            check_unit_interval(f"nus[{i}]", nu)
        check_eps(self.eps)
        check_weight_decay(self.weight_decay)


class QHAdamW(ElementwiseAlgorithm):
    name = "qhadamw"
    hyperparams = QHAdamWHyperparams
    hp: QHAdamWHyperparams

    def op(self) -> Op:
        return QHADAMW

    def scalars(self, t: int, lr: float, fresh: bool) -> dict[str, float]:
        hp = self.hp
        (beta1, beta2), (nu1, nu2) = hp.betas, hp.nus
        return {
            "decay": 1.0 - lr * hp.weight_decay,
            "one_minus_beta1": 1.0 - beta1,
            "beta2": beta2,
            "one_minus_beta2": 1.0 - beta2,
            "bias_correction1": 1.0 - beta1**t,
            "bias_correction2": 1.0 - beta2**t,
            "nu1": nu1,
            "one_minus_nu1": 1.0 - nu1,
            "nu2": nu2,
            "one_minus_nu2": 1.0 - nu2,
            "neg_lr": -lr,
            "eps": hp.eps,
        }
