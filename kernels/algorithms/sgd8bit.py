r"""SGD with an 8-bit momentum buffer (``bitsandbytes.optim.SGD8bit``'s state).

torch.optim.SGD's update (:mod:`stepd.kernels.algorithms.sgd`: dampening, Nesterov, L2
weight decay, the first step copying the gradient), computed from the dequantized buffer:

.. math::
    g &\leftarrow g + \lambda \theta \\
    b &\leftarrow \mu \hat b + (1 - \tau) g \quad (b \leftarrow g \text{ on the first step}) \\
    \theta &\leftarrow \theta - \eta \,(g + \mu b \text{ if Nesterov else } b) \\
    \hat b &\leftarrow \mathrm{quantize}(b)

Slots ``momentum_buffer`` (uint8 codes on the signed dynamic map) and
``momentum_buffer_absmax`` (float32, one per 256 elements). A separate algorithm rather
than an option of ``sgd``, as in bitsandbytes: its state has another layout, and without
momentum there is nothing to quantize, so ``momentum`` must be > 0 (default 0.9).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..blockwise import BlockwiseOp
from .eightbit import BlockwiseAlgorithm
from .sgd import SGD_MOMENTUM, Sgd, SgdHyperparams

SGD_MOMENTUM8 = BlockwiseOp("sgd_momentum8", SGD_MOMENTUM)


@dataclass(frozen=True)
class Sgd8bitHyperparams(SgdHyperparams):
    algorithm = "sgd8bit"
    momentum: float = 0.9

    def validate(self) -> None:
        super().validate()
        if self.momentum <= 0.0:
            raise ValueError(f"Invalid momentum value: {self.momentum} (sgd8bit needs > 0)")


class Sgd8bit(BlockwiseAlgorithm):
    name = "sgd8bit"
    hyperparams = Sgd8bitHyperparams
    hp: Sgd8bitHyperparams

    def op(self) -> BlockwiseOp:
        return SGD_MOMENTUM8

    def scalars(self, t: int, lr: float, fresh: bool) -> dict[str, float]:
        return Sgd(self.hp).scalars(t, lr, fresh)  # the float32 algorithm's scalars
