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

from stepd.wire import narrow, widen

# (name, shape, param, grad): shape a tuple of ints, param/grad contiguous float32 arrays;
# grad is None where none goes (Register), a step's items always have one (StepItem)
Item = tuple[str, tuple[int, ...], np.ndarray, np.ndarray | None]
StepItem = tuple[str, tuple[int, ...], np.ndarray, np.ndarray]


def write_param(param: np.ndarray, value: np.ndarray) -> None:
    """Write ``value`` (float32 master weights, or the server's copy in any wire precision)
    into the caller's ``param`` in place, rounded to the param's precision where that is
    lower, as torch's ``.to()`` rounds. The one place every transport writes a param."""
    if value.dtype != param.dtype:
        value = narrow(np, widen(np, value), param.dtype)
    np.copyto(param.reshape(-1), value.reshape(-1))


@dataclass(frozen=True)
class Register:
    """Make sure the names exist; where the server already holds one, copy its value in."""

    items: tuple[Item, ...]


@dataclass(frozen=True)
class Step:
    """Apply one gradient per name; every param is overwritten with its new value."""

    items: tuple[StepItem, ...]
    # sync groups: the sender's last gradients of the iteration (the names it did not send
    # are unused by it: their rounds need not wait for it)
    last: bool = False


@dataclass(frozen=True)
class Pull:
    """Write each name's current value (the server's) into its param; nothing is stepped."""

    items: tuple[Item, ...]


@dataclass(frozen=True)
class SyncMembership:
    """This worker joins, leaves or heartbeats its run's sync membership (``action``); the
    result is the membership as the server describes it."""

    action: str  # "join", "leave" or "heartbeat"


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
class SetValue:
    name: str
    value: np.ndarray


@dataclass(frozen=True)
class SetHyperparams:
    changes: Mapping[str, Any]


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
    | Pull
    | EndIteration
    | SyncMembership
    | GetLr
    | SetLr
    | SetHyperparams
    | SetValue
    | GetLrScale
    | SetLrScale
    | GetStateDict
    | LoadStateDict
    | UpdateHessian
)


class Transport(ABC):
    """Carries ops to an optimizer somewhere (in process, or a session with a server)."""

    @abstractmethod
    def handle(self, op: Op) -> Any:
        """Run one op; raises ``stepd.client.errors.StepdError`` subclasses on failure."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections; the transport is unusable afterwards."""


@dataclass(frozen=True)
class Registered:
    """A registration's outcome: ``created`` False means the server had the name already
    (its value was written into the local param: the server's copy wins)."""

    created: bool
    group: str
    version: int


class ServerTransport(ABC):
    """Moves requests to one stepd server and brings the replies back; no policy.

    Each method is one request (one round trip where the protocol allows), raises
    ``TransportError`` when no answer came and the ``ServerError`` subclass of the server's
    status when it refused. Which requests are sent when, retried or remembered is the
    session's business (:mod:`stepd.client.session`).
    """

    url: str
    #: whether a request that got no answer may be sent again on this transport (a
    #: connection that failed mid-message cannot be reused: shm://)
    can_retry: bool = False
    #: whether steps carry request ids (the server then applies a repeated one once)
    request_ids: bool = False

    @abstractmethod
    def open_run(
        self,
        run: str | None,
        fresh: bool,
        worker: str | None,
        group: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Join (or create) the named run, or create an anonymous one (``run`` None); the
        server checks ``group`` and answers with the run's name, ``anonymous``, the wire
        ``protocol``, its ``limits`` and its ``shard``. Every later request acts on that run."""

    @abstractmethod
    def register(
        self,
        name: str,
        shape: tuple[int, ...],
        param: np.ndarray,
        group: Mapping[str, Any],
        lr_scale: float,
        shard: tuple[int, int] | None,
    ) -> Registered: ...

    @abstractmethod
    def step(
        self,
        items: tuple[StepItem, ...],
        versions: Mapping[str, int] | None,
        request_id: str,
        last: bool = False,
    ) -> tuple[dict[str, int], tuple[str, ...]]:
        """Apply the gradients (``last``: see :class:`Step`), write the new values into the
        params; the new versions, and the names the server refused as stale (async groups:
        their params and versions are then the current ones, nothing applied)."""

    @abstractmethod
    def pull(self, items: tuple[Item, ...]) -> dict[str, int]:
        """Write the registered names' current values into the params; their versions."""

    @abstractmethod
    def end_iteration(self) -> int:
        """The new global step; the sync workers dropped from the iteration that ended are
        then in ``last_dropped``."""

    #: the sync workers dropped from the iteration the last end_iteration ended
    last_dropped: tuple[str, ...] = ()

    @abstractmethod
    def membership(self, action: str) -> dict[str, Any]:
        """Join, leave or heartbeat (``action``) this worker's sync membership."""

    @abstractmethod
    def set_lr(self, group: str, lr: float) -> None: ...

    @abstractmethod
    def set_value(self, name: str, value: np.ndarray) -> None:
        """Overwrite a registered parameter's (master) value; its state stays."""

    @abstractmethod
    def set_hyperparams(self, group: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change hyperparameters other than the lr; every hyperparameter now."""

    @abstractmethod
    def group(self, group: str) -> dict[str, Any]:
        """The group's description, its current ``lr`` included."""

    @abstractmethod
    def lr_scale(self, name: str) -> float: ...

    @abstractmethod
    def set_lr_scale(self, name: str, scale: float) -> None: ...

    @abstractmethod
    def update_hessian(self, name: str, hessian: np.ndarray) -> None: ...

    @abstractmethod
    def load_state(self, group: str, body: bytes) -> None:
        """Upload optimizer state (the safetensors of :mod:`stepd.client.state`)."""

    @abstractmethod
    def global_step(self) -> int: ...

    @abstractmethod
    def group_state(self, group: str) -> dict[str, Any]:
        """The group's ``state_dict`` on the server (``lr_scales``: every name's)."""

    @abstractmethod
    def close(self, delete_run: bool = False) -> None:
        """Release the connection; ``delete_run``: delete the run first (best effort)."""
