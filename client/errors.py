"""One exception tree for every transport.

::

    StepdError                     anything the client raises about the service
    ├── TransportError             no answer: connection refused or reset, timeout, bad URL scheme
    └── ServerError                the server answered with an error status (``status``, ``detail``)
        ├── AuthError              401: missing or wrong bearer token
        ├── NotFoundError          404: unknown run, parameter, slot, group or checkpoint
        ├── ConflictError          409: the name is registered with another shape or group
        ├── InvalidRequestError    400 / 413 / 422: the server refused the request's content
        ├── RoundTimeoutError      504: a sync round or barrier did not complete in time
        └── CapacityError          507: over the server's memory budget or the run's quota

Low-level errors (``httpx``) are mapped with ``raise ... from exc``, so the original stays
on ``__cause__``. Bad arguments caught in the client before anything is sent raise the
built-in ``TypeError`` / ``ValueError`` instead: nothing reached a server.
"""

from __future__ import annotations

from typing import Any

from stepd.wire import Status


class StepdError(Exception):
    """Base of every error about talking to stepd."""


class TransportError(StepdError):
    """The request got no answer: connection refused or dropped, timeout, protocol error.

    Over http:// a step is first resent with the same request id (``connect(retries=...)``),
    which the server applies at most once; a step that still fails this way may or may not
    have been applied, and the local parameter is left exactly as it was.
    """


class ServerError(StepdError):
    """The server answered with an error status; ``detail`` is its own explanation."""

    def __init__(self, status: int, detail: Any, method: str = "", path: str = "") -> None:
        self.status = status
        self.detail = detail
        self.method = method
        self.path = path
        where = f"{method} {path}: " if method else ""
        super().__init__(f"{where}HTTP {status}: {detail}")


class AuthError(ServerError):
    """401: the bearer token is missing or wrong."""


class NotFoundError(ServerError):
    """404: the server does not know the parameter (or slot, group, checkpoint)."""


class ConflictError(ServerError):
    """409: the name exists on the server with another shape, group or lr_scale."""


class InvalidRequestError(ServerError):
    """400 / 413 / 422: the server refused the content (bad hyperparameters, body too big…)."""


class CapacityError(ServerError):
    """507: the server's memory budget or the run's quota cannot take what was asked."""


class RoundTimeoutError(ServerError):
    """504: a sync round or barrier did not complete in time; nothing was applied."""


# The statuses are stepd.wire's, the numbers the server's errors carry on every transport.
_BY_STATUS: dict[int, type[ServerError]] = {
    Status.BAD_REQUEST: InvalidRequestError,
    Status.UNAUTHORIZED: AuthError,
    Status.NOT_FOUND: NotFoundError,
    Status.CONFLICT: ConflictError,
    Status.TOO_LARGE: InvalidRequestError,
    Status.INVALID: InvalidRequestError,
    Status.TIMEOUT: RoundTimeoutError,
    Status.INSUFFICIENT_STORAGE: CapacityError,
}


def error_for_status(status: int, detail: Any, method: str = "", path: str = "") -> ServerError:
    """The exception for an HTTP error status (``ServerError`` itself for the others)."""
    return _BY_STATUS.get(status, ServerError)(status, detail, method, path)
