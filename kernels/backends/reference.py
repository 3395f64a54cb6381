"""The NumPy reference backend: each op's readable per-element math, one tensor at a time.

It is the oracle the fused backends are tested against, and the fallback when no C++
compiler is available.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import precision
from ..blockwise import BlockwiseOp
from ..ops import Launch, Op
from ..precision import F32


class ReferenceBackend:
    name = "reference"
    xp = np

    def all_finite(self, x: np.ndarray) -> bool:
        if x.dtype == F32:
            return bool(np.isfinite(x).all())
        return precision.all_finite(np, x)

    def launch(self, op: Op, items: Sequence[Launch]) -> None:
        for it in items:  # flat views: params may arrive flat while the slots are shaped
            slots = [s.reshape(-1) for s in it.slots]
            grad = precision.widen(np, it.grad.reshape(-1))  # exact: the same bits as fused
            op.reference(it.param.reshape(-1), grad, slots, op.unpack(it.args))

    def launch_blockwise(self, op: BlockwiseOp, items: Sequence[Launch]) -> None:
        for it in items:
            arrays = [s.reshape(-1) for s in it.slots]
            grad = precision.widen(np, it.grad.reshape(-1))
            op.reference(it.param.reshape(-1), grad, arrays, op.unpack(it.args))
