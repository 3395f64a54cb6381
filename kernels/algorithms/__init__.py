"""The optimizer algorithms, one per module; ``ALGORITHMS`` maps lowercase names to classes."""

from __future__ import annotations

from .adam import Adam
from .adamw import AdamW
from .base import Algorithm, ElementwiseAlgorithm, StepItem
from .lion import Lion
from .nadamw import NAdamW
from .qhadamw import QHAdamW
from .radam import RAdam
from .sgd import Sgd

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (Sgd, Adam, AdamW, NAdamW, RAdam, QHAdamW, Lion)
}

__all__ = ["ALGORITHMS", "Algorithm", "ElementwiseAlgorithm", "StepItem"]
