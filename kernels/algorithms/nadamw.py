r"""NAdamW: Nesterov-accelerated Adam (Dozat 2016) with decoupled weight decay.

``torch.optim.NAdam(decoupled_weight_decay=True)``'s update, with
:math:`\mu_t = \beta_1 (1 - \tfrac12 \, 0.96^{t \psi})` for ``momentum_decay`` ψ, or
:math:`\mu_t = \beta_1` (no schedule, as ``optax.nadamw``) when ``momentum_decay`` is None:

.. math::
    \theta &\leftarrow \theta (1 - \eta \lambda) \\
    m &\leftarrow m + (1 - \beta_1)(g - m), \quad v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
    d &= \sqrt{v / (1 - \beta_2^t)} + \epsilon \\
    \theta &\leftarrow \theta - \eta \frac{1 - \mu_t}{1 - \prod_{i \le t} \mu_i} \frac{g}{d}
                             - \eta \frac{\mu_{t+1}}{1 - \prod_{i \le t+1} \mu_i} \frac{m}{d}

The products of μ depend on the global step only, so they are host scalars, not state.
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
    m += a.one_minus_beta1 * (g - m)
    v[...] = v * a.beta2 + a.one_minus_beta2 * g * g
    denom = np.sqrt(v / a.bias_correction2) + a.eps
    p += a.grad_coef * g / denom
    p += a.avg_coef * m / denom


NADAMW = Op(
    "nadamw",
    ("exp_avg", "exp_avg_sq"),
    (
        "decay",
        "one_minus_beta1",
        "beta2",
        "one_minus_beta2",
        "bias_correction2",
        "eps",
        "grad_coef",
        "avg_coef",
    ),
    _reference,
)


@dataclass(frozen=True)
class NAdamWHyperparams(Hyperparams):
    algorithm = "nadamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    momentum_decay: float | None = None

    def validate(self) -> None:
        check_lr(self.lr)
        check_betas(self.betas)
        check_eps(self.eps)
        check_weight_decay(self.weight_decay)
        psi = self.momentum_decay
        if psi is not None and not (math.isfinite(psi) and psi >= 0.0):  # null: no schedule
            raise ValueError(f"Invalid momentum_decay value: {psi} (finite, >= 0, or null)")


class NAdamW(ElementwiseAlgorithm):
    name = "nadamw"
    hyperparams = NAdamWHyperparams
    hp: NAdamWHyperparams

    def __init__(self, hp: NAdamWHyperparams) -> None:
        super().__init__(hp)
        self._mu_products = [1.0]  # prod_{i <= t} mu_i, grown on demand

    def op(self) -> Op:
        return NADAMW

    def _mu(self, t: int) -> float:
        beta1, psi = self.hp.betas[0], self.hp.momentum_decay
        return beta1 if psi is None else beta1 * (1.0 - 0.5 * 0.96 ** (t * psi))

    def _mu_product(self, t: int) -> float:
        products = self._mu_products
        while len(products) <= t:
            products.append(products[-1] * self._mu(len(products)))
        return products[t]

    def scalars(self, t: int, lr: float, fresh: bool) -> dict[str, float]:
        hp = self.hp
        beta1, beta2 = hp.betas
        mu, mu_next = self._mu(t), self._mu(t + 1)
        return {
            "decay": 1.0 - lr * hp.weight_decay,
            "one_minus_beta1": 1.0 - beta1,
            "beta2": beta2,
            "one_minus_beta2": 1.0 - beta2,
            "bias_correction2": 1.0 - beta2**t,
            "eps": hp.eps,
            "grad_coef": -lr * (1.0 - mu) / (1.0 - self._mu_product(t)),
            "avg_coef": -lr * mu_next / (1.0 - self._mu_product(t + 1)),
        }
