r"""Adam with L2 weight decay (Kingma & Ba 2015), in ``torch.optim.Adam``'s formulation.

.. math::
    g &\leftarrow g + \lambda \theta \\
    m &\leftarrow m + (1 - \beta_1)(g - m) \\
    v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
    \theta &\leftarrow \theta - \frac{\eta}{1 - \beta_1^t}
        \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}

Slots ``exp_avg`` (m) and ``exp_avg_sq`` (v); with ``amsgrad=True`` also
``max_exp_avg_sq``, the running maximum of v, which replaces v in the denominator (the op
``adam_amsgrad``). The fused op ``adam`` also serves AdamW, which
decays θ by ``1 - ηλ`` first instead of adding λθ to the gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..hyperparams import Hyperparams, check_betas, check_eps, check_lr, check_weight_decay
from ..ops import Op
from .base import ElementwiseAlgorithm


def _reference(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    m, v = slots
    p *= a.decay
    g = g + a.l2 * p
    m += a.one_minus_beta1 * (g - m)
    v[...] = v * a.beta2 + a.one_minus_beta2 * g * g
    denom = np.sqrt(v) / a.bias_correction2_sqrt + a.eps
    p -= a.step_size * m / denom


def _reference_amsgrad(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    m, v, v_max = slots
    p *= a.decay
    g = g + a.l2 * p
    m += a.one_minus_beta1 * (g - m)
    v[...] = v * a.beta2 + a.one_minus_beta2 * g * g
    np.maximum(v_max, v, out=v_max)
    denom = np.sqrt(v_max) / a.bias_correction2_sqrt + a.eps
    p -= a.step_size * m / denom


_ADAM_ARGS = (
    "decay",
    "l2",
    "one_minus_beta1",
    "beta2",
    "one_minus_beta2",
    "step_size",
    "bias_correction2_sqrt",
    "eps",
)
ADAM = Op("adam", ("exp_avg", "exp_avg_sq"), _ADAM_ARGS, _reference)
# amsgrad=True: the denominator takes the running maximum of v (torch's max_exp_avg_sq).
ADAM_AMSGRAD = Op(
    "adam_amsgrad", ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), _ADAM_ARGS, _reference_amsgrad
)


def adam_scalars(
    t: int, lr: float, betas: tuple[float, float], eps: float, decay: float, l2: float
) -> dict[str, float]:
    beta1, beta2 = betas
    return {
        "decay": decay,
        "l2": l2,
        "one_minus_beta1": 1.0 - beta1,
        "beta2": beta2,
        "one_minus_beta2": 1.0 - beta2,
        "step_size": lr / (1.0 - beta1**t),
        "bias_correction2_sqrt": math.sqrt(1.0 - beta2**t),
        "eps": eps,
    }


@dataclass(frozen=True)
class AdamCoreHyperparams(Hyperparams):
    """What Adam's whole family takes (LAMB too), with torch.optim's defaults and checks."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def validate(self) -> None:
        check_lr(self.lr)
        check_betas(self.betas)
        check_eps(self.eps)
        check_weight_decay(self.weight_decay)


@dataclass(frozen=True)
class AdamHyperparams(AdamCoreHyperparams):
    algorithm = "adam"
    amsgrad: bool = False  # the running max of v in the denominator (a third slot)


class Adam(ElementwiseAlgorithm):
    name = "adam"
    hyperparams = AdamHyperparams
    hp: AdamHyperparams

    def op(self) -> Op:
        return ADAM_AMSGRAD if self.hp.amsgrad else ADAM

    def scalars(self, t: int, lr: float, fresh: bool) -> dict[str, float]:
        hp = self.hp
        return adam_scalars(t, lr, hp.betas, hp.eps, decay=1.0, l2=hp.weight_decay)
