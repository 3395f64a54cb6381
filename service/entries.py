"""A parameter as the store holds it, and what a step did to it."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .groups import Group
from .history import History


@dataclass
class Entry:
    name: str
    shape: tuple[int, ...]
    group: Group
    param: Any  # device array, flat float32
    version: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_grad_norm: float | None = None
    last_update_norm: float | None = None
    norms_at_version: int | None = None
    last_param_norm: float | None = None  # measured with the two norms above
    history: History | None = None  # the measurements, newest --history of them
    # Its norms were due but not measured: a step holds copies of at most MEASURE_BYTES of
    # old values (or one parameter), so the rest are measured at their next step.
    measure_due: bool = False

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class StepOutcome:
    name: str
    version: int
    applied: bool  # False: the gradient was non-finite and skipped
    param: np.ndarray | None = None  # host copy right after this step, when asked for
    staleness: int | None = None  # async groups: versions the gradient lagged
    replayed: bool = False  # a repeated request id: nothing was applied this time
    # async groups: the request carried a gradient beyond max_staleness, so none of it was
    # applied; version (and param) are the current ones, for the worker to continue from
    stale: bool = False
    # sync groups: the workers dropped from the iteration when its round completed (their
    # lease ran out): the round went on without them
    dropped: tuple[str, ...] = ()
