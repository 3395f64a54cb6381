"""The errors of the server's operations, each with the status every adapter answers it with.

::

    StoreError
    ├── NotFound          404  unknown run, parameter, slot, group or checkpoint
    ├── Conflict          409  conflicting registration, duplicate contribution
    │   └── Stale         409  an async gradient beyond the staleness bound (the engine
    │                          answers it with the current values instead: never sent)
    ├── Invalid           422  refused content (and malformed tensors: ``wire.WireError``)
    ├── TooLarge          413  over a size limit
    ├── Unauthorized      401  a shm:// HELLO without the server's token
    ├── StragglerTimeout  504  a sync round or barrier did not complete in time
    ├── OverBudget        507  memory the server's budget or the run's quota cannot take
    └── StorageFull       507  the disk is full (a checkpoint was not written)

The statuses are :class:`stepd.wire.Status`, the numbers the client maps back to its own
exception tree, so HTTP and shm:// fail the same way for the same cause.
"""

from __future__ import annotations

from typing import ClassVar

from stepd.wire import Status, WireError


class StoreError(Exception):
    """Base of the errors the adapters map to statuses."""

    status: ClassVar[Status] = Status.INTERNAL


class NotFound(StoreError):
    status = Status.NOT_FOUND


class Conflict(StoreError):
    status = Status.CONFLICT


class Stale(Conflict):
    """An async gradient computed from a parameter too many versions old; not applied. The
    store raises it; the engine turns it into a reply (``StepOutcome.stale``) that carries
    the current values, so no adapter ever answers it as an error."""


class Invalid(StoreError):
    status = Status.INVALID


class Unauthorized(StoreError):
    status = Status.UNAUTHORIZED


class TooLarge(StoreError):
    status = Status.TOO_LARGE


class StragglerTimeout(StoreError):
    """A sync round did not complete in time; nothing was applied."""

    status = Status.TIMEOUT


def status_of(exc: BaseException) -> Status:
    """The status an adapter answers ``exc`` with (500 for anything unexpected)."""
    if isinstance(exc, StoreError):
        return exc.status
    if isinstance(exc, WireError):
        return Status.INVALID
    return Status.INTERNAL


class OverBudget(StoreError):
    """A registration would commit more memory than the server's budget or the run's quota."""

    status = Status.INSUFFICIENT_STORAGE


class StorageFull(StoreError):
    """The disk took no more: a checkpoint was not written (the previous one is intact)."""

    status = Status.INSUFFICIENT_STORAGE
