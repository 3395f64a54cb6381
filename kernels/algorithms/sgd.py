r"""SGD with momentum, dampening, Nesterov momentum and L2 weight decay.

Same update as ``torch.optim.SGD``:

.. math::
    g &\leftarrow g + \lambda \theta \\
    b &\leftarrow \begin{cases} g & \text{first step of this parameter} \\
                                \mu b + (1 - \tau) g & \text{otherwise} \end{cases} \\
    d &\leftarrow \begin{cases} g + \mu b & \text{Nesterov} \\ b & \text{otherwise}\end{cases}\\
    \theta &\leftarrow \theta - \eta d

With ``momentum = 0`` no buffer is kept (op ``sgd``); otherwise one slot,
``momentum_buffer`` (op ``sgd_momentum``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..hyperparams import Hyperparams, check_lr, check_unit_interval, check_weight_decay
from ..ops import Op
from .base import ElementwiseAlgorithm


@dataclass(frozen=True)
class SgdHyperparams(Hyperparams):
    algorithm = "sgd"
    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def validate(self) -> None:
        check_lr(self.lr)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {self.momentum}")
        check_unit_interval("dampening", self.dampening)
        check_weight_decay(self.weight_decay)
        if self.nesterov and (self.momentum <= 0.0 or self.dampening != 0.0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def _reference(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    g = g + a.weight_decay * p
    p += a.neg_lr * g


def _reference_momentum(p: np.ndarray, g: np.ndarray, slots: Sequence[np.ndarray], a) -> None:
    (buf,) = slots
    g = g + a.weight_decay * p
    buf[...] = a.buf_decay * buf + a.grad_coef * g
    d = g + a.nesterov_momentum * buf if a.nesterov_momentum != 0 else buf
    p += a.neg_lr * d


SGD = Op("sgd", (), ("neg_lr", "weight_decay"), _reference)
SGD_MOMENTUM = Op(
    "sgd_momentum",
    ("momentum_buffer",),
    ("neg_lr", "weight_decay", "buf_decay", "grad_coef", "nesterov_momentum"),
    _reference_momentum,
)


class Sgd(ElementwiseAlgorithm):
    name = "sgd"
    hyperparams = SgdHyperparams
    hp: SgdHyperparams

    def op(self) -> Op:
        return SGD_MOMENTUM if self.hp.momentum > 0.0 else SGD

    def scalars(self, t: int, lr: float, fresh: bool) -> dict[str, float]:
        hp = self.hp
        return {
            "neg_lr": -lr,
            "weight_decay": hp.weight_decay,
            "buf_decay": 0.0 if fresh else hp.momentum,
            "grad_coef": 1.0 if fresh else 1.0 - hp.dampening,
            "nesterov_momentum": hp.momentum if hp.nesterov else 0.0,
        }
