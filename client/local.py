"""``local://``: the numeric core in this process, no server (tests, notebooks, baseline).

``local://`` uses the ``auto`` backend (fused CPU kernels, NumPy fallback with a warning);
``local://?backend=reference`` (or ``cpu``) picks one explicitly. Registration is a no-op:
state is created, zero-initialised, on a name's first step, exactly as on a server.
``update_hessian`` on an algorithm that takes no Hessian raises the numeric core's
``TypeError`` (over http:// and shm:// the server's 422 is an ``InvalidRequestError``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .transport import (
    EndIteration,
    GetLr,
    GetLrScale,
    GetStateDict,
    LoadStateDict,
    Op,
    Register,
    SetLr,
    SetLrScale,
    Step,
    Transport,
    UpdateHessian,
)


class LocalTransport(Transport):
    """Wraps ``stepd.kernels.create_optimizer(algorithm, backend=..., **hyperparams)``."""

    def __init__(
        self, algorithm: str, hyperparams: Mapping[str, Any], backend: str = "auto"
    ) -> None:
        from stepd.kernels import create_optimizer  # only local:// needs the numeric core

        self.optimizer = create_optimizer(algorithm, backend=backend, **dict(hyperparams))

    def handle(self, op: Op) -> Any:
        opt = self.optimizer
        match op:
            case Step(items=items):
                return opt.step_batch(items)
            case Register():
                return None
            case EndIteration():
                return opt.end_iteration()
            case GetLr():
                return opt.lr
            case SetLr(lr=lr):
                return opt.set_lr(lr)
            case GetLrScale(name=name):
                return opt.lr_scale(name)
            case SetLrScale(name=name, scale=scale):
                return opt.set_lr_scale(name, scale)
            case GetStateDict():
                return opt.state_dict()
            case LoadStateDict(state=state):
                return opt.load_state_dict(state)
            case UpdateHessian(name=name, shape=shape, hessian=hessian):
                return opt.update_hessian(name, shape, hessian)  # TypeError: not Sophia
        raise TypeError(f"unknown op {op!r}")
