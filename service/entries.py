"""A parameter as the store holds it, and what a step did to it."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .groups import Group


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
