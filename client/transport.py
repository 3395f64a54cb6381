"""The transport interface: one method, ``handle(op)``, plus ``close()`` (like httpx's
``BaseTransport``).

An op is a small frozen dataclass naming one call of the Optimizer contract; the front end
(:class:`client.StepdOptimizer`) validates every argument before it builds one, so a
transport only moves already-checked data. ``Step`` and ``Register`` carry
``(name, shape, param, grad)`` tuples whose ``param`` the transport writes in place, and only
once the whole answer is in hand: a failed call leaves every param exactly as it was.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# (name, shape, param, grad): shape a tuple of ints, param/grad contiguous float32 arrays
Item = tuple[str, tuple[int, ...], np.ndarray, np.ndarray | None]


@dataclass(frozen=True)
class Register:
    """Make sure the names exist; where the server already holds one, copy its value in."""

    items: tuple[Item, ...]


@dataclass(frozen=True)
class Step:
    """Apply one gradient per name; every param is overwritten with its new value."""

    items: tuple[Item, ...]


@dataclass(frozen=True)
class EndIteration:
    """Advance the global step; the result is the new step."""


@dataclass(frozen=True)
class GetLr:
    """The learning rate now in force (``None`` if not known yet)."""


@dataclass(frozen=True)
class SetLr:
    lr: float


@dataclass(frozen=True)
class GetLrScale:
    name: str


@dataclass(frozen=True)
class SetLrScale:
    name: str
    scale: float


@dataclass(frozen=True)
class GetStateDict:
    """The structure of ``kernels.Optimizer.state_dict()``."""


@dataclass(frozen=True)
class LoadStateDict:
    state: Mapping[str, Any]


@dataclass(frozen=True)
class UpdateHessian:
    """A Hessian-diagonal estimate for ``name`` (Sophia): contiguous float32, finite, the
    parameter's size; ``name`` is registered on this transport already."""

    name: str
    shape: tuple[int, ...]
    hessian: np.ndarray


Op = (
    Register
    | Step
    | EndIteration
    | GetLr
    | SetLr
    | GetLrScale
    | SetLrScale
    | GetStateDict
    | LoadStateDict
    | UpdateHessian
)


class Transport(ABC):
    """Carries ops to an optimizer somewhere (in process, over HTTP, …)."""

    @abstractmethod
    def handle(self, op: Op) -> Any:
        """Run one op; raises ``stepd.client.errors.StepdError`` subclasses on failure."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections; the transport is unusable afterwards."""
