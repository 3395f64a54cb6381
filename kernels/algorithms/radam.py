r"""RAdam: Adam with a rectified adaptive learning rate (Liu et al. 2020), as ``torch.optim.RAdam``.

.. math::
    m &\leftarrow m + (1 - \beta_1)(g - m), \quad v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
    \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \quad
    \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t} \\
    \theta &\leftarrow \theta - \eta \frac{m}{1 - \beta_1^t}
        \cdot \begin{cases}
        r_t \frac{\sqrt{1 - \beta_2^t}}{\sqrt{v} + \epsilon} & \rho_t > 5 \\
        1 & \text{otherwise} \end{cases}, \quad
    r_t = \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}
                     {(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}

The threshold is torch's ``rho_t > 5`` (the paper's Algorithm 2 uses 4); with the default
β₂ = 0.999 the rectified branch starts at t = 6. Weight decay is L2 (added to g) by default,
decoupled (θ ← θ(1 − ηλ) first) with ``decoupled_weight_decay=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..hyperparams import Hyperparams, check_betas, check_eps, check_lr, check_weight_decay
from ..ops import Op
from .base import ElementwiseAlgorithm

RHO_THRESHOLD = 5.0


def _reference(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    m, v = slots
    p *= a.decay
    g = g + a.l2 * p
    m += a.one_minus_beta1 * (g - m)
    v[...] = v * a.beta2 + a.one_minus_beta2 * g * g
    m_hat = m / a.bias_correction1
    if a.rectify != 0:
        adaptive = a.bias_correction2_sqrt / (np.sqrt(v) + a.eps)
        p -= m_hat * a.lr * adaptive * a.rect
    else:
        p -= m_hat * a.lr


RADAM = Op(
    "radam",
    ("exp_avg", "exp_avg_sq"),
    (
        "decay",
        "l2",
        "one_minus_beta1",
        "beta2",
        "one_minus_beta2",
        "bias_correction1",
        "lr",
        "bias_correction2_sqrt",
        "eps",
        "rect",
        "rectify",
    ),
    _reference,
)


@dataclass(frozen=True)
class RAdamHyperparams(Hyperparams):
    algorithm = "radam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False

    def validate(self) -> None:
        check_lr(self.lr)
        check_betas(self.betas)
        check_eps(self.eps)
        check_weight_decay(self.weight_decay)


class RAdam(ElementwiseAlgorithm):
    name = "radam"
    hyperparams = RAdamHyperparams
    hp: RAdamHyperparams

    def op(self) -> Op:
        return RADAM

    def scalars(self, t: int, lr: float, fresh: bool) -> dict[str, float]:
        hp = self.hp
        beta1, beta2 = hp.betas
        bias_correction2 = 1.0 - beta2**t
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        rho_t = rho_inf - 2.0 * t * beta2**t / bias_correction2
        rectify = rho_t > RHO_THRESHOLD
        rect = (
            math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            if rectify
            else 0.0
        )
        decoupled = hp.decoupled_weight_decay
        return {
            "decay": 1.0 - lr * hp.weight_decay if decoupled else 1.0,
            "l2": 0.0 if decoupled else hp.weight_decay,
            "one_minus_beta1": 1.0 - beta1,
            "beta2": beta2,
            "one_minus_beta2": 1.0 - beta2,
            "bias_correction1": 1.0 - beta1**t,
            "lr": lr,
            "bias_correction2_sqrt": math.sqrt(bias_correction2),
            "eps": hp.eps,
            "rect": rect,
            "rectify": 1.0 if rectify else 0.0,
        }
