r"""Lion with 8-bit momentum, as ``bitsandbytes.optim.Lion8bit``.

Lion's update (:mod:`stepd.kernels.algorithms.lion`) from the dequantized momentum:

.. math::
    c &= \beta_1 \hat m + (1 - \beta_1) g \\
    \theta &\leftarrow \theta (1 - \eta \lambda) - \eta \,\mathrm{sign}(c) \\
    \hat m &\leftarrow \mathrm{quantize}(\beta_2 \hat m + (1 - \beta_2) g)

Slots ``exp_avg`` (uint8 codes on the signed dynamic map) and ``exp_avg_absmax`` (float32,
one per 256 elements); see :mod:`stepd.kernels.blockwise`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..blockwise import BlockwiseOp
from .eightbit import BlockwiseAlgorithm
from .lion import LION, Lion, LionHyperparams

LION8 = BlockwiseOp("lion8", LION)


@dataclass(frozen=True)
class Lion8bitHyperparams(LionHyperparams):
    algorithm = "lion8bit"


class Lion8bit(BlockwiseAlgorithm):
    name = "lion8bit"
    hyperparams = Lion8bitHyperparams
    hp: Lion8bitHyperparams

    def op(self) -> BlockwiseOp:
        return LION8

    def scalars(self, t: int, lr: float, fresh: bool) -> dict[str, float]:
        return Lion(self.hp).scalars(t, lr, fresh)  # the float32 algorithm's scalars
