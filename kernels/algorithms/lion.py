r"""Lion: evolved sign momentum (Chen et al. 2023), decoupled weight decay.

.. math::
    c &= \beta_1 m + (1 - \beta_1) g \\
    \theta &\leftarrow \theta (1 - \eta \lambda) - \eta \,\mathrm{sign}(c) \\
    m &\leftarrow \beta_2 m + (1 - \beta_2) g

One slot, ``exp_avg``; sign(0) = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..hyperparams import Hyperparams, check_betas, check_lr, check_weight_decay
from ..ops import Op
from .base import ElementwiseAlgorithm


def _reference(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    (m,) = slots
    c = a.beta1 * m + a.one_minus_beta1 * g
    p *= a.decay
    p += a.neg_lr * np.sign(c)
    m[...] = a.beta2 * m + a.one_minus_beta2 * g


LION = Op(
    "lion",
    ("exp_avg",),
    ("decay", "neg_lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2"),
    _reference,
)


@dataclass(frozen=True)
class LionHyperparams(Hyperparams):
    algorithm = "lion"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0

    def validate(self) -> None:
        check_lr(self.lr)
        check_betas(self.betas)
        check_weight_decay(self.weight_decay)


class Lion(ElementwiseAlgorithm):
    name = "lion"
    hyperparams = LionHyperparams
    hp: LionHyperparams

    def op(self) -> Op:
        return LION

    def scalars(self, t: int, lr: float, fresh: bool) -> dict[str, float]:
        hp = self.hp
        beta1, beta2 = hp.betas
        return {
            "decay": 1.0 - lr * hp.weight_decay,
            "neg_lr": -lr,
            "beta1": beta1,
            "one_minus_beta1": 1.0 - beta1,
            "beta2": beta2,
            "one_minus_beta2": 1.0 - beta2,
        }
