"""The rlx-optim ``Optimizer`` contract as a Python object, over any transport.

``connect(url, algorithm, **hyperparams)`` picks the transport from the URL scheme:

- ``http://host:port`` (or ``https://``): the stepd HTTP API (:mod:`stepd.client.http`);
- ``local://``: the numeric core in this process, no server (:mod:`stepd.client.local`);
- ``shm:///path/to/stepd.sock``: same host, shared memory (:mod:`stepd.client.shm`).

For a server, a :class:`stepd.client.session.Session` holds the client's policy once over
the transport. :class:`StepdOptimizer` validates every argument before anything is sent
(``TypeError`` / ``ValueError``, nothing changed), then hands one op to the session. It is
not thread-safe: use one per thread, or a lock.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol, overload, runtime_checkable
from urllib.parse import parse_qs, urlsplit

import numpy as np

from stepd.wire import BF16, F16, F32, PARAM_NAME_RE, PARAM_NAME_RULE, widen

from .errors import StepdError
from .session import Session
from .transport import (
    EndIteration,
    GetLr,
    GetLrScale,
    GetStateDict,
    Item,
    LoadStateDict,
    Pull,
    Register,
    ServerTransport,
    SetHyperparams,
    SetLr,
    SetLrScale,
    SetValue,
    Step,
    StepItem,
    SyncMembership,
    Transport,
    UpdateHessian,
)

# A param (the model's copy of its weights) and its gradient may be in the model's precision:
# bfloat16 (uint16 bits) or float16. The server keeps float32 master weights and state; the
# gradient travels in its precision and the param comes back rounded to its own.
PRECISIONS = (F32, BF16, F16)

StepArgs = tuple[str, Sequence[int], np.ndarray, np.ndarray]
_F32 = np.dtype(np.float32)


@runtime_checkable
class Optimizer(Protocol):
    """What training code may rely on, whatever the transport (rlx-optim's trait)."""

    def step(
        self, name: str, shape: Sequence[int], param: np.ndarray, grad: np.ndarray
    ) -> None: ...
    def step_batch(self, items: Iterable[StepArgs], last: bool = False) -> None: ...
    def end_iteration(self) -> int: ...
    def lr_scale(self, name: str) -> float: ...
    def set_lr_scale(self, name: str, scale: float) -> None: ...
    def set_lr(self, lr: float) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
    def close(self) -> None: ...


def _name(name: Any) -> str:
    if type(name) is not str or not name:
        raise TypeError(f"parameter name must be a non-empty str, got {name!r}")
    if not PARAM_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid parameter name {name!r}: {PARAM_NAME_RULE}")
    return name


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"{name!r}: shape must be a sequence of ints, got {shape!r}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0:
            raise ValueError(f"{name!r}: shape must hold non-negative ints, got {shape!r}")
    return tuple(int(d) for d in dims)


def _array(name: str, role: str, arr: Any, shape: tuple[int, ...], dtypes: tuple = (_F32,)) -> None:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name!r}: {role} must be a numpy.ndarray, got {type(arr).__name__}")
    if arr.dtype not in dtypes:
        if dtypes == (_F32,):
            want = "float32 (native little-endian)"
        else:
            want = "float32, bfloat16 (as uint16 bits) or float16"
        raise TypeError(f"{name!r}: {role} must be {want}, got {arr.dtype}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name!r}: {role} must be C-contiguous (no silent copies)")
    if arr.size != math.prod(shape):
        raise ValueError(
            f"{name!r}: {role} has {arr.size} elements, shape {list(shape)} needs "
            f"{math.prod(shape)}"
        )


def _rate(what: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{what} must be finite and >= 0, got {value}")
    return value


class StepdOptimizer:
    """Named float32 parameters stepped by a stepd optimizer behind ``transport``.

    ``param`` arrays are updated in place with the optimizer's result; a call that raises
    leaves them exactly as they were. Over HTTP a name's first step registers it, and if the
    server already holds that name (same config), the server's copy wins (see
    :mod:`stepd.client.http`).
    """

    def __init__(self, session: Transport) -> None:
        self.session = session
        self._shapes: dict[str, tuple[int, ...]] = {}
        # the shape and array last registered or stepped for each name: where pull() writes
        self._params: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}
        self._closed = False

    @property
    def transport(self) -> Any:
        """What carries the bytes: the session's server transport, or ``local://``'s own."""
        return getattr(self.session, "transport", self.session)

    @property
    def run(self) -> str | None:
        """The run this optimizer acts on (``None`` in process)."""
        return getattr(self.session, "run", None)

    # -- the rlx-optim Optimizer trait ------------------------------------------------------

    def step(self, name: str, shape: Sequence[int], param: np.ndarray, grad: np.ndarray) -> None:
        """Apply ``grad`` to ``name``; ``param`` (contiguous) is updated in place. Both are
        float32 or in the model's precision (bfloat16 as uint16 bits, float16): the server
        keeps float32 master weights, and ``param`` gets them rounded to its dtype."""
        # The common case in one condition (a known name, its shape as a tuple, two good
        # arrays): this runs per tensor per step, and the general checks cost a few us.
        known = self._shapes.get(name) if type(name) is str else None
        if (
            known is not None
            and shape == known
            and type(shape) is tuple
            and type(param) is np.ndarray
            and type(grad) is np.ndarray
            and param.dtype == _F32
            and grad.dtype == _F32
            and param.size == grad.size == math.prod(known)
            and param.flags.c_contiguous
            and param.flags.writeable
            and grad.flags.c_contiguous
            and not self._closed
        ):
            self.session.handle(Step(((name, known, param, grad),)))
            self._params[name] = (known, param)
            return
        self.step_batch([(name, shape, param, grad)])

    def step_batch(self, items: Iterable[StepArgs], last: bool = False) -> None:
        """Step several parameters in one round trip; all are validated before any is sent.

        ``last`` (sync groups): these are this worker's last gradients of the iteration, so
        the rounds of the run's parameters it did not send (unused in this iteration, DDP's
        ``find_unused_parameters`` case) go on without it rather than wait for its
        ``end_iteration``."""
        checked = self._check_items(items, with_grad=True)
        if checked:
            self._call(Step(checked, last))
            self._remember(checked)

    def register(self, name: str, shape: Sequence[int], param: np.ndarray) -> None:
        """Register ``name`` now rather than on its first step (server copy wins, in place)."""
        checked = self._check_items([(name, shape, param, None)], with_grad=False)
        self._call(Register(checked))
        self._remember(checked)

    def pull(self, name: str) -> None:
        """Write ``name``'s current value into its param (the array last registered or
        stepped), and take its version as the one the next gradient is computed from; nothing
        is stepped. For a worker that wants fresh parameters without stepping (an async
        worker that lagged, one that joins late). In process (``local://``) the param is the
        value already."""
        name = _name(name)
        known = self._params.get(name)
        if known is None:
            raise ValueError(f"{name!r} is not registered: register or step it before a pull")
        self._call(Pull(((name, *known, None),)))

    def pull_all(self) -> None:
        """:meth:`pull` for every registered name, in one round trip."""
        items = tuple((n, dims, p, None) for n, (dims, p) in self._params.items())
        if items:
            self._call(Pull(items))

    @property
    def stale_gradients(self) -> int:
        """How many gradients the server refused as stale (async groups, beyond
        ``max_staleness``); each such step wrote the current values into its params instead,
        so the next gradient is computed from them. 0 in process."""
        return int(getattr(self.session, "stale_gradients", 0))

    def buffers(
        self, name: str, shape: Sequence[int], init: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Register ``name`` (initial value ``init``) and return ``(param, grad)`` arrays that
        live in shared memory the server reads and writes (shm:// only): write the gradient
        into ``grad`` and step with both, and the step copies nothing. If the run has the
        name already, ``param`` holds the server's copy. Valid until :meth:`close`."""
        buffers = getattr(self.transport, "buffers", None)
        if buffers is None:
            raise TypeError("buffers() needs shm://: other transports have no shared memory")
        param = np.array(init, dtype=_F32, order="C", copy=True)
        self.register(name, shape, param)
        return buffers(name, self._shapes[name])

    def update_hessian(self, name: str, shape: Sequence[int], hessian: np.ndarray) -> None:
        """Pass a Hessian-diagonal estimate for ``name`` (Sophia); the next step uses it.

        ``hessian``: contiguous float32, finite, the size of ``shape``. ``name`` must be known
        already (registered, stepped, or loaded by ``load_state_dict``): an estimate carries
        no parameter value to register the name with, so an unknown one is a ``ValueError``
        — call :meth:`register` first. An algorithm that takes no Hessian refuses it:
        ``InvalidRequestError`` over http:// and shm:// (the server's 422), the numeric
        core's ``TypeError`` over local://. Nothing changes on any error.
        """
        name = _name(name)
        dims = _shape(name, shape)
        _array(name, "hessian", hessian, dims)
        known = self._shapes.get(name)
        if known is None:
            raise ValueError(
                f"{name!r} is not registered: call register(name, shape, param) or step it "
                "before sending its Hessian estimate"
            )
        if known != dims:
            raise ValueError(f"{name!r}: shape {dims} differs from its registered {known}")
        if not np.isfinite(hessian).all():
            raise ValueError(f"{name!r}: the Hessian estimate has non-finite entries")
        self._call(UpdateHessian(name, dims, hessian))

    def end_iteration(self) -> int:
        """Advance the global step counter; returns the new value."""
        return int(self._call(EndIteration()))

    # -- sync membership (elastic workers) --------------------------------------------------

    def join(self) -> dict[str, Any]:
        """Make this worker a member of its run's sync iterations: of the running one if it
        has not started, else of the next — then this returns once that one begins (with
        ``member_from``). For a worker that comes late, leaves and comes back, or was
        dropped; the first workers of a run join implicitly with their first step."""
        return self._membership("join")

    def leave(self) -> dict[str, Any]:
        """Leave the sync iterations now: what this worker sent in the running iteration
        counts, and nothing waits for it any more."""
        return self._membership("leave")

    def heartbeat(self) -> dict[str, Any]:
        """Keep this worker's lease (the group's ``lease_s``) while it sends nothing for a
        while (a long evaluation); every step and end_iteration does this too."""
        return self._membership("heartbeat")

    @property
    def dropped(self) -> tuple[str, ...]:
        """The sync workers dropped (their lease ran out) from the iteration that this
        worker's last ``end_iteration`` ended."""
        return tuple(getattr(self.transport, "last_dropped", ()))

    def _membership(self, action: str) -> dict[str, Any]:
        if getattr(self.session, "worker", None) is None:
            raise ValueError(
                f"{action} is for sync workers: connect to a server with worker=... and a named run"
            )
        out = dict(self._call(SyncMembership(action)))
        if out.get("member_from") is None:  # only a join has one (http:// sends a null)
            out.pop("member_from", None)
        return out

    def lr_scale(self, name: str) -> float:
        return float(self._call(GetLrScale(_name(name))))

    def set_lr_scale(self, name: str, scale: float) -> None:
        name = _name(name)
        self._call(SetLrScale(name, _rate(f"lr_scale for {name!r}", scale)))

    def set_lr(self, lr: float) -> None:
        self._call(SetLr(_rate("learning rate", lr)))

    def set_value(self, name: str, shape: Sequence[int], value: np.ndarray) -> None:
        """Overwrite ``name``'s value where the optimizer keeps it (the server's master
        weights; its optimizer state stays): for weights loaded into the model from a
        checkpoint after the optimizer registered them. A name not registered yet takes
        its value when it registers."""
        name = _name(name)
        dims = _shape(name, shape)
        _array(name, "value", value, dims, PRECISIONS)
        known = self._shapes.get(name)
        if known is not None and known != dims:
            raise ValueError(f"{name!r}: shape {dims} differs from its registered {known}")
        if not np.isfinite(widen(np, value)).all():
            raise ValueError(f"{name!r}: the value has non-finite entries")
        self._call(SetValue(name, value))

    def set_hyperparams(self, **changes: Any) -> dict[str, Any]:
        """Change hyperparameters other than the lr (``set_lr``) from the next step on —
        e.g. ``betas`` or ``momentum`` cycled by a scheduler; the optimizer state stays.
        Returns every hyperparameter now. A change of the state's layout (``amsgrad``) or
        of the lr is refused (``InvalidRequestError``)."""
        if not changes:
            raise ValueError("set_hyperparams needs at least one hyperparameter")
        return dict(self._call(SetHyperparams(dict(changes))))

    @property
    def lr(self) -> float | None:
        """The learning rate now in force (over HTTP: ``None`` until known to the server)."""
        return self._call(GetLr())

    def state_dict(self) -> dict[str, Any]:
        """The structure of ``kernels.Optimizer.state_dict()`` (arrays are host copies)."""
        return self._call(GetStateDict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace all optimizer state, as ``kernels.Optimizer.load_state_dict`` does.

        Over ``http://`` / ``shm://`` the state of names not registered yet is uploaded when
        they register (see :mod:`stepd.client.state`); parameter values are not part of it."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state).__name__}")
        self._call(LoadStateDict(state))
        self._shapes = {n: tuple(s["shape"]) for n, s in state.get("state", {}).items()}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.session.close()

    def __enter__(self) -> StepdOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _call(self, op: Any) -> Any:
        if self._closed:
            raise StepdError("this optimizer is closed")
        return self.session.handle(op)

    @overload
    def _check_items(
        self, items: Iterable[Any], with_grad: Literal[True]
    ) -> tuple[StepItem, ...]: ...
    @overload
    def _check_items(self, items: Iterable[Any], with_grad: Literal[False]) -> tuple[Item, ...]: ...
    def _check_items(self, items: Iterable[Any], with_grad: bool) -> tuple[Item, ...]:
        """``with_grad``: each item's grad is checked too (a step's items: ``StepItem``s)."""
        checked = []
        seen = set()
        for item in items:
            try:
                name, shape, param, grad = item
            except (TypeError, ValueError):
                raise TypeError(f"expected (name, shape, param, grad), got {item!r}") from None
            name = _name(name)
            if name in seen:
                raise ValueError(f"{name!r} appears more than once in one step_batch")
            seen.add(name)
            dims = _shape(name, shape)
            _array(name, "param", param, dims, PRECISIONS)
            if not param.flags.writeable:
                raise ValueError(f"{name!r}: param must be writable (it is updated in place)")
            if with_grad:
                _array(name, "grad", grad, dims, PRECISIONS)
            known = self._shapes.get(name)
            if known is not None and known != dims:
                raise ValueError(f"{name!r}: shape {dims} differs from its registered {known}")
            checked.append((name, dims, param, grad))
        return tuple(checked)

    def _remember(self, items: tuple[Item, ...]) -> None:
        for name, dims, param, _ in items:
            self._shapes[name] = dims
            self._params[name] = (dims, param)


def connect(
    url: str | Sequence[str],
    algorithm: str = "adamw",
    *,
    run: str | None = None,
    fresh: bool = False,
    token: str | None = None,
    timeout: float = 30.0,
    worker: str | None = None,
    workers: Mapping[str, Any] | str | None = None,
    retries: int = 2,
    heartbeat: bool = True,
    **hyperparams: Any,
) -> Any:
    """An optimizer behind ``url``: ``http://host:port``, ``shm:///path/stepd.sock`` or
    ``local://`` (``local://?backend=cpu``).

    ``run``: join that *named* run on the server — shared with every client that names it
    (distributed workers, a resumed job): names it already holds take the server's values.
    ``fresh=True`` deletes the named run first. Without ``run``, the optimizer gets an
    *anonymous* run of its own: nothing is shared with other optimizers, a re-run script
    starts afresh, and the run is deleted when the optimizer closes (or, if this process
    dies, after the server's idle TTL). ``local://`` keeps named runs in this process.

    ``hyperparams`` follow torch.optim names (``lr``, ``betas``, ``weight_decay``…); the
    server checks them, and the algorithm, right here (``InvalidRequestError``), as does
    ``local://``. A dead server is a ``TransportError``, a wrong token an ``AuthError``.

    Several servers: ``connect([url0, url1, ...])`` shards the parameters over them by a
    stable hash of the name (:mod:`stepd.client.sharding`). Distributed workers: ``worker``
    is this process's id and ``workers`` the group's mode, e.g. ``{"mode": "sync", "count":
    4}`` or ``{"mode": "async", "max_staleness": 8}``; they need a named ``run``.
    ``workers="torchrun"``: a sync group of the job's ``WORLD_SIZE`` processes, this one
    named by its ``RANK`` (from the environment torchrun gives each process); under torchrun
    (``RANK`` and ``WORLD_SIZE`` set) a sync config without ``count``, or without ``worker``,
    takes them from there too.

    ``ray://<name>``: the shards of a :class:`stepd.ray.StepdCluster` (:mod:`stepd.ray`).

    ``retries`` (http:// only): how many times a step is resent, with the same request id,
    after a transport failure; the server applies it once whatever arrives (see
    :mod:`stepd.client.session`). 0 disables it: a lost reply is then a ``TransportError``.

    ``heartbeat``: a sync worker of a run with a lease (``lease_s``) keeps it from a
    background thread while idle (see :mod:`stepd.client.session`); ``False`` leaves the
    lease to the requests the worker makes, so a worker hung in its own code is dropped too.
    """
    if isinstance(url, str) and url.startswith("ray://"):
        # The shards of a stepd.ray cluster, found through Ray (optional: imported on use)
        from stepd.ray import connect as connect_ray

        return connect_ray(
            url,
            algorithm,
            run=run,
            fresh=fresh,
            token=token,
            timeout=timeout,
            worker=worker,
            workers=workers,
            retries=retries,
            heartbeat=heartbeat,
            **hyperparams,
        )
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(f"retries must be an int, got {retries!r}")
    if not 0 <= retries <= 10:
        raise ValueError(f"retries must be in [0, 10], got {retries}")
    if not isinstance(algorithm, str):
        raise TypeError(f"algorithm must be a str, got {algorithm!r}")
    if run is not None and not isinstance(run, str):
        raise TypeError(f"run must be a str, got {run!r}")
    if not isinstance(fresh, bool):
        raise TypeError(f"fresh must be a bool, got {fresh!r}")
    if fresh and run is None:
        raise ValueError("fresh=True needs a named run (an anonymous run is always fresh)")
    worker, workers = _launcher_workers(worker, workers, os.environ)
    options = {
        "run": run,
        "fresh": fresh,
        "token": token,
        "timeout": _rate("timeout", timeout),
        "worker": worker,
        "workers": workers,
        "retries": retries,
        "heartbeat": bool(heartbeat),
    }
    if not isinstance(url, str):
        from .sharding import ShardedOptimizer

        urls = list(url)
        opts: list[StepdOptimizer] = []
        try:
            for index, one in enumerate(urls):
                if urlsplit(one).scheme not in ("http", "https", "shm"):
                    raise ValueError(f"sharding needs http:// or shm:// servers, got {one!r}")
                opts.append(_connect_one(one, algorithm, hyperparams, (index, len(urls)), options))
        except BaseException:
            for opt in opts:
                opt.close()
            raise
        return ShardedOptimizer(opts)
    return _connect_one(url, algorithm, hyperparams, None, options)


def _launcher_workers(
    worker: str | None, workers: Mapping[str, Any] | str | None, env: Mapping[str, str]
) -> tuple[str | None, Mapping[str, Any] | None]:
    """The worker id and config, completed from a launcher's environment (torchrun's, or any
    that sets ``RANK`` and ``WORLD_SIZE``) for sync groups: the sync count is the world size
    and the worker id the rank, so every process of the job runs the same line. What the
    caller gave explicitly stays as given."""
    if isinstance(workers, str):
        if workers != "torchrun":
            raise ValueError(f"workers must be a mapping or 'torchrun', got {workers!r}")
        if "RANK" not in env or "WORLD_SIZE" not in env:
            raise ValueError(
                "workers='torchrun' takes RANK and WORLD_SIZE from the environment, which has "
                "neither set: start the script with torchrun (python -m torch.distributed.run)"
            )
        workers = {"mode": "sync"}
    if (
        not isinstance(workers, Mapping)
        or workers.get("mode") != "sync"
        or "RANK" not in env
        or "WORLD_SIZE" not in env
        or (worker is not None and "count" in workers)
    ):
        return worker, workers
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    except ValueError:
        raise ValueError(
            f"RANK={env['RANK']!r} and WORLD_SIZE={env['WORLD_SIZE']!r} must be integers"
        ) from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must be in [0, WORLD_SIZE={world})")
    return (str(rank) if worker is None else worker), {"count": world, **workers}


def _connect_one(
    url: str,
    algorithm: str,
    hyperparams: Mapping[str, Any],
    shard: tuple[int, int] | None,
    options: Mapping[str, Any],
) -> StepdOptimizer:
    parts = urlsplit(url)
    worker, workers = options["worker"], options["workers"]
    if parts.scheme == "local":
        from .local import LocalTransport

        if worker is not None or workers is not None:
            raise ValueError("worker modes need a server over http:// or shm://, not local://")
        query = parse_qs(parts.query)
        backend = query.pop("backend", ["auto"])[-1]
        if query or parts.netloc or parts.path not in ("", "/"):
            raise ValueError(f"local:// takes only ?backend=..., got {url!r}")
        return StepdOptimizer(
            LocalTransport(
                algorithm, hyperparams, backend=backend, run=options["run"], fresh=options["fresh"]
            )
        )
    if (worker is not None or workers is not None) and options["run"] is None:
        raise ValueError(
            "distributed workers meet in a named run: pass run=... (an anonymous run is private "
            "to one optimizer)"
        )
    transport: ServerTransport
    if parts.scheme in ("http", "https"):
        from .http import HttpTransport

        transport = HttpTransport(url, token=options["token"], timeout=options["timeout"])
    elif parts.scheme == "shm":
        from .shm import ShmTransport

        if parts.netloc or not parts.path or parts.query:
            raise ValueError(f"shm:// takes a socket path, shm:///path/to/stepd.sock, got {url!r}")
        transport = ShmTransport(parts.path, timeout=options["timeout"], token=options["token"])
    else:
        raise ValueError(
            f"unsupported URL {url!r}: expected http://host:port, shm:///path or local://"
        )
    try:
        session = Session(
            transport,
            algorithm,
            hyperparams,
            run=options["run"],
            fresh=options["fresh"],
            worker=worker,
            workers=workers,
            shard=shard,
            retries=options["retries"],
            heartbeat=options["heartbeat"],
        )
    except BaseException:
        transport.close()
        raise
    return StepdOptimizer(session)
