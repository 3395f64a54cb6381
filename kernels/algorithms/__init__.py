"""The optimizer algorithms, one per module; ``ALGORITHMS`` maps lowercase names to classes."""

from __future__ import annotations

from .adafactor import Adafactor
from .adam import Adam
from .adamw import AdamW
from .adamw8bit import AdamW8bit
from .base import Algorithm, ElementwiseAlgorithm, StepItem
from .kron import Kron
from .lamb import Lamb
from .lion import Lion
from .lion8bit import Lion8bit
from .mars import Mars
from .muon import Muon
from .nadamw import NAdamW
from .qhadamw import QHAdamW
from .radam import RAdam
from .sgd import Sgd
from .sgd8bit import Sgd8bit
from .soap import Soap
from .sophia import Sophia

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls
    for cls in (
        Adafactor,
        Sgd,
        Adam,
        AdamW,
        NAdamW,
        RAdam,
        QHAdamW,
        Lion,
        Muon,
        Kron,
        Sophia,
        Lamb,
        Mars,
        Soap,
        AdamW8bit,
        Lion8bit,
        Sgd8bit,
    )
}

__all__ = ["ALGORITHMS", "Algorithm", "ElementwiseAlgorithm", "StepItem"]
