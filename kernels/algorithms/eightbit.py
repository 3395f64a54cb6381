"""What the 8-bit algorithms share: blockwise-quantized state (:mod:`stepd.kernels.blockwise`)
stepped by one fused kernel per step, and its dequantized view for inspection.

Each quantized state ``s`` takes two slots, ``s`` (uint8 codes, the parameter's shape) and
``s_absmax`` (float32, one per block of 256 elements); zero codes with zero absmax are a
zero state, so fresh slots are allocated as for any algorithm.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..blockwise import BLOCK, CODES, SIGNED, UNSIGNED, BlockwiseOp, absmax_shape, dynamic_map
from ..ops import Launch
from .base import Algorithm, StepItem


class BlockwiseAlgorithm(Algorithm):
    """An algorithm whose update is one blockwise 8-bit op plus host scalars."""

    reads_any_grad = True

    @abstractmethod
    def op(self) -> BlockwiseOp:
        """The fused op (fixed by the hyperparameters)."""

    @abstractmethod
    def scalars(self, t: int, lr: float, fresh: bool) -> dict[str, float]:
        """The op's Args for step ``t`` and effective lr, computed in float64."""

    def slot_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        op = self.op()
        return {
            **{s: shape for s in op.states},
            **{f"{s}_absmax": absmax_shape(shape) for s in op.states},
        }

    def slot_dtypes(self, shape: tuple[int, ...]) -> dict[str, np.dtype]:
        states = self.op().states
        return {k: CODES if k in states else np.dtype(np.float32) for k in self.slot_shapes(shape)}

    def dequantized(self, xp: Any, slots: Mapping[str, Any]) -> dict[str, Any]:
        """Every slot, each state's codes replaced by its float32 values (absmax as is)."""
        out = dict(slots)
        for kind, state in zip((SIGNED, UNSIGNED), self.op().states, strict=False):
            codes = slots[state]
            scale = xp.repeat(slots[f"{state}_absmax"], BLOCK)[: codes.size]
            values = xp.asarray(dynamic_map(kind == SIGNED))[codes.reshape(-1)] * scale
            out[state] = values.reshape(codes.shape)
        return out

    def step(self, backend: Any, items: Sequence[StepItem], t: int) -> None:
        op = self.op()
        rows: dict[tuple[int, float, bool], np.ndarray] = {}
        launches = []
        for it in items:
            key = (t if it.t is None else it.t, it.lr, it.fresh)
            row = rows.get(key)
            if row is None:
                row = rows[key] = op.pack(self.scalars(*key))
            launches.append(Launch(it.param, it.grad, [it.slots[s] for s in op.slots], row))
        backend.launch_blockwise(op, launches)
