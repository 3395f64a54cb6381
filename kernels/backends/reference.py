"""The NumPy reference backend: each op's readable per-element math, one tensor at a time.

It is the oracle the fused backends are tested against, and the fallback when no C++
compiler is available.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..ops import Launch, Op


class ReferenceBackend:
    name = "reference"
    xp = np

    def all_finite(self, x: np.ndarray) -> bool:
        return bool(np.isfinite(x).all())

    def launch(self, op: Op, items: Sequence[Launch]) -> None:
        for it in items:  # flat views: params may arrive flat while the slots are shaped
            slots = [s.reshape(-1) for s in it.slots]
            op.reference(it.param.reshape(-1), it.grad.reshape(-1), slots, op.unpack(it.args))
