r"""AdamW with 8-bit state, as ``bitsandbytes.optim.AdamW8bit``.

The update is AdamW's (:mod:`stepd.kernels.algorithms.adamw`), computed in float32 from the
dequantized moments; m and v are then stored blockwise-quantized
(:mod:`stepd.kernels.blockwise`): m on the signed dynamic map, v on the unsigned one, each
with a float32 absmax per 256 elements.

.. math::
    \theta &\leftarrow \theta (1 - \eta \lambda) \\
    m &\leftarrow \hat m + (1 - \beta_1)(g - \hat m), \quad
    v \leftarrow \beta_2 \hat v + (1 - \beta_2) g^2 \\
    \theta &\leftarrow \theta - \frac{\eta}{1 - \beta_1^t}
        \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon} \\
    (\hat m, \hat v) &\leftarrow \mathrm{quantize}(m, v)

Slots: ``exp_avg``, ``exp_avg_sq`` (uint8) and ``exp_avg_absmax``, ``exp_avg_sq_absmax``
(float32): 2 bytes + 8 bytes per 256 elements of state per parameter element, against
AdamW's 8. Unlike bitsandbytes, small tensors are quantized too (no ``min_8bit_size``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..blockwise import BlockwiseOp
from .adam import ADAM, AdamCoreHyperparams, adam_scalars
from .eightbit import BlockwiseAlgorithm

ADAM8 = BlockwiseOp("adam8", ADAM)


@dataclass(frozen=True)
class AdamW8bitHyperparams(AdamCoreHyperparams):
    algorithm = "adamw8bit"
    weight_decay: float = 1e-2


class AdamW8bit(BlockwiseAlgorithm):
    name = "adamw8bit"
    hyperparams = AdamW8bitHyperparams
    hp: AdamW8bitHyperparams

    def op(self) -> BlockwiseOp:
        return ADAM8

    def scalars(self, t: int, lr: float, fresh: bool) -> dict[str, float]:
        hp = self.hp
        return adam_scalars(t, lr, hp.betas, hp.eps, decay=1.0 - lr * hp.weight_decay, l2=0.0)
