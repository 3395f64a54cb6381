"""What every algorithm implements, and the shared driver of the fused elementwise family.

An :class:`Algorithm` owns frozen hyperparameters, says which state slots a parameter of a
given shape needs (allocated lazily at zero by the optimizer), and steps a group of
parameters at global step ``t`` (1-based: ``t = global_step + 1``). Elementwise algorithms
only compute host scalars; :class:`ElementwiseAlgorithm` turns those into one fused launch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..hyperparams import Hyperparams
from ..ops import Launch, Op

_ROW_STEPS = 8  # how many steps' packed scalars an elementwise algorithm keeps


@dataclass
class StepItem:
    """One parameter's part of a step: buffers (flat or shaped, contiguous) and context."""

    name: str
    shape: tuple[int, ...]
    param: Any
    grad: Any
    slots: Mapping[str, Any]
    lr: float  # effective: optimizer lr x lr_scale(name)
    fresh: bool  # first step of this name (its slots are still zero)
    # Its own step (``step_count="per_param"``, elementwise algorithms); None: the call's t.
    t: int | None = None


class Algorithm(ABC):
    name: ClassVar[str]
    hyperparams: ClassVar[type[Hyperparams]]
    takes_hessian: ClassVar[bool] = False  # True: implements update_hessian
    # False: a step costs more than its element count says (matrix factors, eigenbases,
    # Newton–Schulz), so even a small one may take seconds: a server never runs it inline.
    linear_cost: ClassVar[bool] = True
    # True: step() takes gradients as they arrive (float32, bfloat16 or float16), its kernels
    # widen them; False: the optimizer widens them to float32 first.
    reads_any_grad: ClassVar[bool] = False

    def __init__(self, hp: Hyperparams) -> None:
        if not isinstance(hp, self.hyperparams):
            raise TypeError(f"{self.name} takes {self.hyperparams.__name__}, got {type(hp)}")
        self.hp = hp

    @abstractmethod
    def slot_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """State buffers (name → shape) a parameter of ``shape`` needs, in a fixed order."""

    def slot_dtypes(self, shape: tuple[int, ...]) -> dict[str, np.dtype]:
        """Each slot's dtype: float32 unless the algorithm stores its state narrower."""
        return {slot: np.dtype(np.float32) for slot in self.slot_shapes(shape)}

    def dequantized(self, xp: Any, slots: Mapping[str, Any]) -> dict[str, Any]:
        """The slots as the float32 values they stand for (what inspection shows); the
        slots themselves unless the state is quantized."""
        return dict(slots)

    @abstractmethod
    def step(self, backend: Any, items: Sequence[StepItem], t: int) -> None:
        """Update every item's param and slots in place."""

    def update_hessian(self, backend: Any, item: StepItem, hessian: Any, t: int) -> None:
        """Take a caller-supplied Hessian-diagonal estimate (Sophia); others refuse it."""
        raise TypeError(f"{self.name} does not take a Hessian estimate")


class ElementwiseAlgorithm(Algorithm):
    """An algorithm whose update is one fused per-element op plus host scalars."""

    reads_any_grad = True

    # args_row's cache: {t: {(lr, fresh): packed row}} for the few current steps (one, unless
    # parameters count their own steps); set on first use.
    _rows: dict[int, dict[tuple[float, bool], np.ndarray]]

    @abstractmethod
    def op(self) -> Op:
        """The fused op (fixed by the hyperparameters)."""

    @abstractmethod
    def scalars(self, t: int, lr: float, fresh: bool) -> dict[str, float]:
        """The op's Args for global step ``t`` and effective lr, computed in float64."""

    def slot_shapes(self, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {slot: shape for slot in self.op().slots}

    def args_row(self, t: int, lr: float, fresh: bool) -> np.ndarray:
        """The op's packed scalars for (t, lr, fresh), kept for the current ``t``: packing
        costs about as much as a small tensor's whole launch. Never written after packing."""
        rows = self.__dict__.get("_rows")
        if rows is None:
            rows = self._rows = {}
        at_t = rows.get(t)
        if at_t is None:
            if len(rows) >= _ROW_STEPS:  # a new step: the oldest ones are done with
                rows.clear()
            at_t = rows[t] = {}
        row = at_t.get((lr, fresh))
        if row is None:
            row = at_t[lr, fresh] = self.op().pack(self.scalars(t, lr, fresh))
        return row

    def step(self, backend: Any, items: Sequence[StepItem], t: int) -> None:
        op = self.op()
        names = op.slots
        launches = [
            Launch(
                it.param,
                it.grad,
                [it.slots[s] for s in names],
                self.args_row(t if it.t is None else it.t, it.lr, it.fresh),
            )
            for it in items
        ]
        backend.launch(op, launches)
