r"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019), as ``torch.optim.AdamW``.

.. math::
    \theta &\leftarrow \theta (1 - \eta \lambda) \\
    m &\leftarrow m + (1 - \beta_1)(g - m) \\
    v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
    \theta &\leftarrow \theta - \frac{\eta}{1 - \beta_1^t}
        \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}

``amsgrad=True`` keeps the running maximum of v and divides by it (``adam_amsgrad``).
Runs the fused ``adam`` op (see :mod:`stepd.kernels.algorithms.adam`) with ``l2 = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..ops import Op
from .adam import ADAM, ADAM_AMSGRAD, AdamHyperparams, adam_scalars
from .base import ElementwiseAlgorithm


@dataclass(frozen=True)
class AdamWHyperparams(AdamHyperparams):
    algorithm = "adamw"
    weight_decay: float = 1e-2


class AdamW(ElementwiseAlgorithm):
    name = "adamw"
    hyperparams = AdamWHyperparams
    hp: AdamWHyperparams

    def op(self) -> Op:
        return ADAM_AMSGRAD if self.hp.amsgrad else ADAM

    def scalars(self, t: int, lr: float, fresh: bool) -> dict[str, float]:
        hp = self.hp
        return adam_scalars(t, lr, hp.betas, hp.eps, decay=1.0 - lr * hp.weight_decay, l2=0.0)
