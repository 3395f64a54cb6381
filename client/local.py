"""``local://``: the numeric core in this process, no server (tests, notebooks, baseline).

``local://`` uses the ``auto`` backend (fused CPU kernels, NumPy fallback with a warning);
``local://?backend=reference`` (or ``cpu``) picks one explicitly. Registration is a no-op:
state is created, zero-initialised, on a name's first step, exactly as on a server.

It answers like a server would: what the numeric core refuses (an unknown algorithm, invalid
hyperparameters, a Hessian for an algorithm that takes none) is an ``InvalidRequestError``
with the core's message, the server's 422 for the same call, and it refuses what a server
refuses by default: a first value or a gradient with NaN or Inf entries (nothing applied). ``connect("local://",
run="x")`` joins the process's named run ``x``: optimizers that name it share one optimizer
(its state, global step, lr and lr_scales; local:// keeps no parameter values, so nothing
like the server's copy exists here), ``fresh=True`` starts it anew; without ``run`` the
optimizer is its own.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from stepd.wire import F32, Status, widen

from .errors import ConflictError, InvalidRequestError
from .state import check
from .transport import (
    EndIteration,
    GetLr,
    GetLrScale,
    GetStateDict,
    Item,
    LoadStateDict,
    Op,
    Pull,
    Register,
    SetHyperparams,
    SetLr,
    SetLrScale,
    SetValue,
    Step,
    StepItem,
    Transport,
    UpdateHessian,
    write_param,
)

_runs: dict[str, tuple[tuple[str, str, str], Any]] = {}  # name -> (config, optimizer)
_runs_lock = threading.Lock()


def _all_finite(x: np.ndarray) -> bool:
    return bool(np.isfinite(widen(np, x)).all())


def _refused(exc: Exception, what: str) -> InvalidRequestError:
    return InvalidRequestError(Status.INVALID, str(exc), "local", what)


class LocalTransport(Transport):
    """Wraps ``stepd.kernels.create_optimizer(algorithm, backend=..., **hyperparams)``."""

    def __init__(
        self,
        algorithm: str,
        hyperparams: Mapping[str, Any],
        backend: str = "auto",
        run: str | None = None,
        fresh: bool = False,
    ) -> None:
        from stepd.kernels import create_optimizer  # only local:// needs the numeric core

        try:
            opt = create_optimizer(algorithm, backend=backend, **dict(hyperparams))
        except (TypeError, ValueError, OverflowError) as exc:
            raise _refused(exc, "connect") from None
        self.run = run
        self._seen: set[str] = set()  # names whose first value was checked
        # float32 master weights the optimizer steps in place of the caller's arrays: of
        # parameters held in the model's precision (bfloat16, float16), and of every
        # parameter on a GPU backend (device arrays; the caller's host arrays get copies)
        self._masters: dict[str, Any] = {}
        core = opt.backend
        self._xp = core.xp
        self._device = core.xp is not np
        # host arrays: the compiled check (one pass, no temporaries) where the core has one
        self._finite = core.all_finite if core.xp is np else _all_finite
        if run is None:
            self.optimizer = opt
            return
        config = (algorithm, repr(sorted(opt.hyperparams.to_dict().items())), backend)
        with _runs_lock:
            known = _runs.get(run)
            if known is None or fresh:
                _runs[run] = (config, opt)
            elif known[0] != config:
                raise ConflictError(
                    Status.CONFLICT,
                    f"local run {run!r} runs {known[0][0]} with other settings: local:// runs "
                    "hold one optimizer",
                    "local",
                    "connect",
                )
            self.optimizer = _runs[run][1]

    def handle(self, op: Op) -> Any:
        if isinstance(op, LoadStateDict):  # the structure is checked as for a server, first
            check(op.state, self.optimizer.hyperparams.algorithm)
        try:
            return self._handle(op)
        except (TypeError, ValueError) as exc:  # the core refused it, as a server would
            raise _refused(exc, type(op).__name__) from None

    def _master(self, name: str, param: np.ndarray) -> Any:
        """The float32 master of a parameter the caller holds in lower precision, or in host
        memory while the optimizer runs on a GPU."""
        master = self._masters.get(name)
        if master is None:
            value = widen(np, param).reshape(-1)
            master = self._masters[name] = self._xp.array(value, dtype=np.float32, copy=True)
        return master

    def _host(self, master: Any) -> np.ndarray:
        return master.get() if self._device else master

    def _to_caller(self, param: np.ndarray, master: Any) -> None:
        write_param(param, self._host(master))

    def _admit(self, items: tuple[Item, ...], step: tuple[StepItem, ...] = ()) -> None:
        """Refuse non-finite first values of ``items`` and gradients of ``step`` (a step's
        items, the same ones), as a server does (all before any)."""
        for name, _, param, _ in items:
            if name not in self._seen and not self._finite(param):
                raise InvalidRequestError(
                    Status.INVALID, f"{name!r}: initial value has non-finite entries", "local", ""
                )
        bad = [name for name, _, _, g in step if not self._finite(g)]
        if bad:
            detail = f"non-finite gradient values for {', '.join(map(repr, bad))}"
            raise InvalidRequestError(Status.INVALID, detail, "local", "Step")
        self._seen.update(name for name, *_ in items)

    def _handle(self, op: Op) -> Any:
        opt = self.optimizer
        match op:
            case Step(items=items):
                self._admit(items, step=items)
                if not self._device and all(item[2].dtype == F32 for item in items):
                    return opt.step_batch(items)
                masters = [self._master(name, param) for name, _, param, _ in items]
                xp = self._xp
                opt.step_batch(
                    [
                        (n, s, m, xp.asarray(g).reshape(-1) if self._device else g)
                        for (n, s, _, g), m in zip(items, masters, strict=True)
                    ]
                )
                for (_, _, param, _), master in zip(items, masters, strict=True):
                    self._to_caller(param, master)
                return None
            case Register(items=items):
                return self._admit(items)
            case Pull(items=items):
                # the caller's arrays are the values (no other process steps them), except
                # where a float32 master is kept here
                for name, _, param, _ in items:
                    if name in self._masters:
                        self._to_caller(param, self._masters[name])
                return None
            case EndIteration():
                return opt.end_iteration()
            case GetLr():
                return opt.lr
            case SetLr(lr=lr):
                return opt.set_lr(lr)
            case SetValue(name=name, value=value):
                # the caller's own array is the value, except where a master is kept here
                if name in self._masters:
                    master = self._masters[name]
                    master[...] = self._xp.asarray(widen(np, value).reshape(-1))
                return None
            case SetHyperparams(changes=changes):
                opt.set_hyperparams(**changes)
                return opt.hyperparams.to_dict()
            case GetLrScale(name=name):
                return opt.lr_scale(name)
            case SetLrScale(name=name, scale=scale):
                return opt.set_lr_scale(name, scale)
            case GetStateDict():
                return opt.state_dict()
            case LoadStateDict(state=state):
                return opt.load_state_dict(state)
            case UpdateHessian(name=name, shape=shape, hessian=hessian):
                if self._device:
                    hessian = self._xp.asarray(hessian).reshape(-1)
                return opt.update_hessian(name, shape, hessian)
        raise TypeError(f"unknown op {op!r}")
