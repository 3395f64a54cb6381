"""The stepd client library: the rlx-optim ``Optimizer`` contract over HTTP or in process.

::

    from stepd.client import connect
    opt = connect("http://127.0.0.1:8000", algorithm="adamw", lr=1e-3)  # or "local://"
    opt.step("fc1.weight", param.shape, param, grad)        # param updated in place
    opt.end_iteration()

Light by design: numpy and httpx only (torch in :mod:`stepd.client.torch`, the numeric core only
for ``local://``). Errors: see :mod:`stepd.client.errors`.
"""

from __future__ import annotations

from .errors import (
    AuthError,
    CapacityError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    RoundTimeoutError,
    ServerError,
    StepdError,
    TransportError,
)
from .optimizer import Optimizer, StepdOptimizer, connect
from .transport import Transport

__all__ = [
    "AuthError",
    "CapacityError",
    "ConflictError",
    "InvalidRequestError",
    "NotFoundError",
    "Optimizer",
    "RoundTimeoutError",
    "ServerError",
    "StepdError",
    "StepdOptimizer",
    "Transport",
    "TransportError",
    "connect",
]
