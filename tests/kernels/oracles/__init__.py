"""Parity cases against independent implementations, one module per algorithm family.

Each module exports ``CASES: list[ParityCase]``; ``test_parity.py`` runs them all as one
table. An oracle is built from torch parameters and exposes ``step()`` reading ``p.grad``
(torch.optim and pytorch-optimizer already do; wrap anything else to match).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SHAPES: tuple[tuple[int, ...], ...] = ((), (1,), (37,), (16, 9), (3, 5, 7))


@dataclass(frozen=True)
class ParityCase:
    id: str
    algorithm: str
    hparams: dict[str, Any]
    oracle: Callable[[Sequence[Any]], Any]  # list[torch.nn.Parameter] -> has .step()
    shapes: Sequence[tuple[int, ...]] = SHAPES
    steps: int = 50
    rtol: float = 1e-5
    atol: float = 1e-6
    # Per-step hooks: lr schedule (step index -> lr or None) and lr_scale per shape index.
    lr_at: Callable[[int], float | None] | None = None
    lr_scales: dict[int, float] = field(default_factory=dict)
    # Edits each drawn gradient in place before both sides see it (e.g. zeroes dead lines).
    grad_hook: Callable[[np.ndarray], None] | None = None


def all_cases() -> list[ParityCase]:
    import importlib
    import pkgutil

    cases: list[ParityCase] = []
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        cases += importlib.import_module(f"{__name__}.{mod.name}").CASES
    return cases
