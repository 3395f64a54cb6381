"""stepd: an optimizer-step service.

::

    import stepd
    opt = stepd.connect("http://127.0.0.1:8000", algorithm="adamw", lr=1e-3)  # a server
    opt = stepd.create_optimizer("adamw", lr=1e-3)                           # in process

The packages: :mod:`stepd.kernels` (the numeric core), :mod:`stepd.service` (the server),
:mod:`stepd.client` (the client library) and :mod:`stepd.wire` (the formats both ends share).
``connect`` and ``create_optimizer`` are imported on first use, so ``import stepd.wire`` stays
light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

__all__ = ["__version__", "connect", "create_optimizer"]

if TYPE_CHECKING:
    from stepd.client import connect
    from stepd.kernels import create_optimizer


def __getattr__(name: str) -> Any:
    if name == "connect":
        from stepd.client import connect

        return connect
    if name == "create_optimizer":
        from stepd.kernels import create_optimizer

        return create_optimizer
    raise AttributeError(f"module 'stepd' has no attribute {name!r}")
