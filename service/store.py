"""The parameter store: named parameters on the device, grouped under optimizers.

Each run (service/runs.py) has one store. A parameter is registered once with its shape,
initial value and group (algorithm + hyperparameters, validated by the algorithm's own
dataclass) and an lr_scale. Parameters with the same group configuration share one
``stepd.kernels.Optimizer``; one global step spans the run's groups.

Locking: a store-wide readers-writer lock (steps and registrations share it; ending an
iteration, setting the lr, checkpoints and restores own it) plus one lock per parameter, so
steps of different parameters run in parallel and steps of one parameter serialise. Every
request is validated completely before anything is written: a failed call changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import numpy as np
from stepd.kernels import Optimizer, create_optimizer, get_backend, l2_norm
from stepd.kernels.hyperparams import check_effective_lr, check_lr_scale

from stepd.wire import shard_of, widen

from .entries import Entry, StepOutcome
from .errors import Conflict, Invalid, NotFound, Stale
from .groups import Group, check_name, committed_bytes, resolve_group
from .requests import RequestLog
from .rwlock import RWLock, WouldBlock
from .snapshots import Snapshots
from .workers import MEMBERSHIP_OPTIONS, membership_options

# The copies of old values a step may hold to measure its parameters' update norms; a
# parameter larger than this is measured alone (see ParamStore._due).
MEASURE_BYTES = 64 << 20

P = ParamSpec("P")
R = TypeVar("R")


def _on_device(method: Callable[P, R]) -> Callable[P, R]:
    """Run a store method's device work on the backend's stream (a CUDA store; see
    kernels/backends/cuda.py), whichever thread calls it: CuPy's current stream is per
    thread, and requests come on many."""

    @functools.wraps(method)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        store = args[0]
        assert isinstance(store, ParamStore)
        with store.device_stream:
            return method(*args, **kwargs)

    return wrapped


class ParamStore(Snapshots):
    """One run's parameters and optimizers (see the module docstring)."""

    def __init__(
        self,
        device: str = "cpu",
        nonfinite: str = "reject",
        stats_every: int = 16,
        shard: tuple[int, int] = (0, 1),
        history: int = 0,
    ) -> None:
        self.backend = get_backend(device)
        self.device = device
        self.nonfinite = nonfinite
        self.stats_every = stats_every
        self.shard = shard  # (index, count)
        self.history = history  # samples of its measured norms each parameter keeps
        self.xp = self.backend.xp
        # The stream the device work of this store is ordered on (CUDA; none on the CPU)
        stream = getattr(self.backend, "stream", None)
        self.device_stream: Any = contextlib.nullcontext() if stream is None else stream
        self.lock = RWLock()
        self._meta = threading.Lock()  # guards the dicts while sharing `lock`
        self._entries: dict[str, Entry] = {}
        self._groups: dict[str, Optimizer] = {}
        self._group_info: dict[str, Group] = {}
        self.global_step = 0
        self.requests = RequestLog()  # step request ids already applied (service/requests.py)
        # The workers config sync clients announced when they joined the run: a shard that
        # holds none of the run's parameters (yet) is still a member of its iterations.
        self._declared: Mapping[str, Any] | None = None

    # -- registration ----------------------------------------------------------------------

    def _check_shard(self, name: str, view: tuple[int, int] | None) -> None:
        index, count = self.shard
        if view is not None and tuple(view) != self.shard:
            raise Conflict(
                f"the client expects shard {view[0]} of {view[1]}, this server is shard "
                f"{index} of {count}: check the client's server list"
            )
        owner = shard_of(name, count)
        if owner != index:
            raise Conflict(
                f"{name!r} belongs to shard {owner} of {count}; this server is shard {index}"
            )

    def sync_timeout(self) -> float:
        declared = self._declared["timeout_s"] if self._declared is not None else 60.0
        return max(
            (g.workers["timeout_s"] for g in self._group_info.values() if "timeout_s" in g.workers),
            default=declared,
        )

    def sync_options(self) -> dict[str, Any] | None:
        """The membership options of this run's sync groups (they all share them: count,
        lease_s, clip_grad_norm), if it has any; else those its sync clients announced."""
        for g in list(self._group_info.values()):
            if g.workers["mode"] == "sync":
                return membership_options(g.workers)
        return None if self._declared is None else membership_options(self._declared)

    def declare_workers(self, workers: Mapping[str, Any]) -> None:
        """A client joins the run with this (canonical) workers config. A sync one makes
        ``end_iteration`` a barrier of the run's members even before any of its parameters
        is registered here — without it, a shard that owns none of a sync run's parameters
        would advance once per worker and run ahead of the others. Membership options that
        differ from the run's are a Conflict now, as they would be at registration."""
        if workers["mode"] != "sync":
            return
        with self._meta:
            _check_membership("this run", self.sync_options(), workers)
            if self._declared is None:
                self._declared = dict(workers)

    @_on_device
    def register(
        self,
        name: str,
        shape: Sequence[int],
        value: np.ndarray | None,
        algorithm: str,
        hyperparams: Mapping[str, Any],
        lr_scale: float = 1.0,
        workers: Mapping[str, Any] | None = None,
        shard_view: tuple[int, int] | None = None,
    ) -> tuple[Entry, bool]:
        """Create ``name`` (True) or confirm an identical registration (False); else Conflict.

        ``shard_view``: the (index, count) the client believes this server has; a client
        that disagrees, or a name this server does not own, is refused (Conflict).
        """
        check_name(name)
        self._check_shard(name, shard_view)
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape) or math.prod(shape) > 1 << 34:
            raise Invalid(f"{name!r}: invalid shape {list(shape)}")
        group, reference = resolve_group(algorithm, hyperparams, workers)
        try:
            check_lr_scale(name, lr_scale)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        if value is not None:
            if value.size != math.prod(shape):
                raise Invalid(
                    f"{name!r}: value has {value.size} elements, shape needs {math.prod(shape)}"
                )
            if not self.backend.all_finite(np.ascontiguousarray(value, np.float32)):
                raise Invalid(f"{name!r}: initial value has non-finite entries")
        with self.lock.shared(), self._meta:
            existing = self._entries.get(name)
            if existing is not None:
                if existing.shape != shape or existing.group != group:
                    raise Conflict(
                        f"{name!r} is registered with shape {list(existing.shape)} and group "
                        f"{existing.group.to_dict()}; got shape {list(shape)} and group "
                        f"{group.to_dict()}"
                    )
                opt = self._groups[group.id]
                if opt.lr_scale(name) != lr_scale:
                    raise Conflict(
                        f"{name!r} is registered with lr_scale {opt.lr_scale(name)}, got {lr_scale}"
                    )
                return existing, False
            current = self._groups.get(group.id, reference)  # the lr the scale multiplies
            try:
                check_effective_lr(current.lr, name, lr_scale)
            except ValueError as exc:
                raise Invalid(str(exc)) from None
            if group.workers["mode"] == "sync":
                _check_membership(repr(name), self.sync_options(), group.workers)
            opt = self._group(group)
            host = np.zeros(math.prod(shape), np.float32) if value is None else value
            param = self.xp.array(np.ascontiguousarray(host, np.float32).reshape(-1), copy=True)
            entry = Entry(name, shape, group, param, history=self.new_history())
            opt.set_lr_scale(name, lr_scale)
            self._entries[name] = entry
            return entry, True

    def _group(self, group: Group) -> Optimizer:
        opt = self._groups.get(group.id)
        if opt is None:
            opt = create_optimizer(group.algorithm, backend=self.device, **group.hyperparams)
            if self.global_step:  # a group created mid-run joins the shared global step
                opt.load_state_dict({**opt.state_dict(), "global_step": self.global_step})
            self._groups[group.id] = opt
            self._group_info[group.id] = group
        return opt

    # -- steps -----------------------------------------------------------------------------

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise NotFound(f"parameter {name!r} is not registered") from None

    @_on_device
    def step(
        self,
        grads: Mapping[str, np.ndarray],
        read_back: bool = False,
        blocking: bool = True,
        based_on: Mapping[str, int] | None = None,
        request_id: str | None = None,
    ) -> list[StepOutcome]:
        """Apply one gradient per name (host arrays: float32, or the model's precision),
        one fused launch per group.

        ``read_back``: also return each parameter as it is right after this step (copied
        under the same lock hold, so no other step can slip in between). ``blocking=False``
        raises ``WouldBlock`` instead of waiting for a lock: the server then retries on a
        worker thread, so a tiny step runs on the event loop only when it cannot stall it.
        ``based_on``: the parameter versions the gradients were computed from; in an async
        group a gradient more than ``max_staleness`` versions behind is refused (Conflict),
        checked under the parameter's lock so no step can slip in between.
        ``request_id``: a request already applied under this id is not applied again; the
        reply is the one recorded for it (see :meth:`_replay`).
        """
        with self.lock.shared(blocking):
            entries = [self.entry(n) for n in grads]
            finite = []
            for e in entries:
                g = grads[e.name]
                if g.size != e.size:
                    raise Invalid(
                        f"{e.name!r}: gradient has {g.size} elements, shape {list(e.shape)} "
                        f"needs {e.size}"
                    )
                finite.append(self.backend.all_finite(g))
            bad = (
                []
                if all(finite)
                else [e.name for e, ok in zip(entries, finite, strict=True) if not ok]
            )
            if bad and self.nonfinite == "reject":
                raise Invalid(f"non-finite gradient values for {', '.join(map(repr, bad))}")
            # Plain acquire/release rather than an ExitStack: this runs on every step.
            held: list[threading.Lock] = []
            try:
                for e in sorted(entries, key=_by_name) if len(entries) > 1 else entries:
                    if not e.lock.acquire(blocking):  # one order for all: no deadlock
                        raise WouldBlock
                    held.append(e.lock)
                if request_id is not None:  # under the locks: one delivery of an id applies
                    replay = self._replay(request_id, entries, read_back)
                    if replay is not None:
                        return replay
                staleness = {
                    n: self._staleness(self._entries[n], v) for n, v in (based_on or {}).items()
                }
                by_group: dict[str, list[Entry]] = {}
                for e, ok in zip(entries, finite, strict=True):
                    if ok:
                        by_group.setdefault(e.group.id, []).append(e)
                for gid, members in by_group.items():
                    self._apply(self._groups[gid], members, grads)
                if request_id is not None:
                    self.requests.put(
                        request_id,
                        {e.name: (e.version, ok) for e, ok in zip(entries, finite, strict=True)},
                    )
                return [
                    StepOutcome(
                        e.name,
                        e.version,
                        ok,
                        self._host(e.param).reshape(e.shape) if read_back else None,
                        staleness.get(e.name),
                    )
                    for e, ok in zip(entries, finite, strict=True)
                ]
            finally:
                for lock in held:
                    lock.release()

    def _replay(
        self, request_id: str, entries: list[Entry], read_back: bool
    ) -> list[StepOutcome] | None:
        """The reply to an id already applied (None if it is new); call holding the locks.

        Versions and applied flags are the recorded ones, the values the current ones: for
        a single client, exactly the original reply.
        """
        record = self.requests.get(request_id)
        if record is None:
            return None
        if set(record) != {e.name for e in entries}:
            raise Conflict(
                f"request id {request_id!r} was already used to step {sorted(record)}, "
                f"not {sorted(e.name for e in entries)}"
            )
        return [
            StepOutcome(
                e.name,
                record[e.name][0],
                record[e.name][1],
                self._host(e.param).reshape(e.shape) if read_back else None,
                replayed=True,
            )
            for e in entries
        ]

    @staticmethod
    def _staleness(e: Entry, based_on: int) -> int:
        lag = e.version - based_on
        if lag < 0:
            raise Invalid(f"{e.name!r}: version {based_on} is ahead of the parameter's {e.version}")
        bound = e.group.workers.get("max_staleness")
        if bound is not None and lag > bound:
            raise Stale(
                f"{e.name!r}: stale gradient, computed from version {based_on} while the "
                f"parameter is at {e.version} (max_staleness {bound}); not applied"
            )
        return lag

    def _apply(self, opt: Optimizer, members: list[Entry], grads: Mapping[str, Any]) -> None:
        xp = self.xp
        dev = {e.name: _flat(xp, grads[e.name]) for e in members}
        measure = self._due(members)
        before = self._copies(measure)
        opt.step_batch([(e.name, e.shape, e.param, dev[e.name]) for e in members])
        for e in members:
            e.version += 1
        now = time.time() if measure else 0.0
        sum_sq = getattr(self.backend, "sum_sq", None)  # the CPU's: float64, threaded
        for e in measure:
            grad = widen(xp, dev[e.name])  # bfloat16 arrives as its bits
            if sum_sq is not None:
                e.last_grad_norm = math.sqrt(sum_sq(grad))
                e.last_update_norm = math.sqrt(sum_sq(e.param, before[e.name]))
                e.last_param_norm = math.sqrt(sum_sq(e.param))
            else:
                e.last_grad_norm = _norm(grad)
                e.last_update_norm = _norm(e.param - before[e.name])
                e.last_param_norm = _norm(e.param)  # the update's relative size needs it
            e.norms_at_version = e.version
            if e.history is not None:
                e.history.append(
                    e.version,
                    self.global_step,
                    now,
                    e.last_grad_norm,
                    e.last_update_norm,
                    e.last_param_norm,
                    opt.lr * opt.lr_scale(e.name),
                )

    def _due(self, members: list[Entry]) -> list[Entry]:
        """The members whose norms this step measures: every ``stats_every``-th step of each,
        as long as the copies of their old values stay within MEASURE_BYTES (one parameter
        always fits); the rest are measured at their next step."""
        every = self.stats_every
        if not every:
            return []
        measure: list[Entry] = []
        held = 0
        for e in members:
            if e.version % every != 0 and not e.measure_due:
                continue
            size = e.size * 4
            e.measure_due = bool(measure) and held + size > MEASURE_BYTES
            if not e.measure_due:
                measure.append(e)
                held += size
        return measure

    def _copies(self, measure: list[Entry]) -> dict[str, Any]:
        """Each measured parameter's value before the step, in one scratch allocation."""
        if not measure:
            return {}
        xp = self.xp
        scratch = xp.empty(sum(e.size for e in measure), dtype=np.float32)
        copy_into = getattr(self.backend, "copy_into", None)  # threaded on the CPU
        out, at = {}, 0
        for e in measure:
            view = scratch[at : at + e.size]
            if copy_into is not None:
                copy_into(view, e.param)
            else:
                view[...] = e.param
            out[e.name] = view
            at += e.size
        return out

    @_on_device
    def update_hessian(self, name: str, hessian: np.ndarray) -> None:
        with self.lock.shared():
            e = self.entry(name)
            if hessian.size != e.size:
                raise Invalid(f"{name!r}: Hessian has {hessian.size} elements, needs {e.size}")
            if not self.backend.all_finite(hessian):
                raise Invalid(f"{name!r}: Hessian estimate has non-finite entries")
            with e.lock:
                try:
                    self._groups[e.group.id].update_hessian(
                        name, e.shape, self.xp.asarray(hessian).reshape(-1)
                    )
                except TypeError as exc:
                    raise Invalid(str(exc)) from None
                if self.xp is not np:
                    # From page-locked memory (an shm segment) the copy to the device is
                    # asynchronous: the caller may reuse that memory once this returns.
                    self.backend.stream.synchronize()

    @_on_device
    def current(
        self, names: Sequence[str], values: bool = True, blocking: bool = True
    ) -> list[tuple[int, np.ndarray | None]]:
        """Each name's version and (``values``) a host copy of its value, read in one hold of
        its lock: a pair that belongs together, for a worker to compute its next gradient
        from. ``blocking=False``: ``WouldBlock`` rather than wait (nothing is changed)."""
        with self.lock.shared(blocking):
            entries = [self.entry(n) for n in names]
            out: list[tuple[int, np.ndarray | None]] = []
            for e in entries:
                if not e.lock.acquire(blocking):
                    raise WouldBlock
                try:
                    value = self._host(e.param).reshape(e.shape) if values else None
                    out.append((e.version, value))
                finally:
                    e.lock.release()
            return out

    @_on_device
    def read(self, name: str) -> np.ndarray:
        """A consistent host copy of the parameter (never torn by a concurrent step)."""
        e = self.entry(name)
        with e.lock:
            return self._host(e.param).reshape(e.shape)

    @_on_device
    def set_value(self, name: str, value: np.ndarray) -> int:
        with self.lock.shared():
            e = self.entry(name)
            if value.size != e.size:
                raise Invalid(f"{name!r}: value has {value.size} elements, needs {e.size}")
            if not self.backend.all_finite(value):
                raise Invalid(f"{name!r}: value has non-finite entries")
            with e.lock:
                e.param[...] = self.xp.asarray(value).reshape(-1)
                e.version += 1
                return e.version

    # -- storage lent by a same-host client (service/shm.py) -------------------------------

    def adopt(self, name: str, storage: np.ndarray) -> bool:
        """Keep ``name``'s value in ``storage`` (a flat float32 host array, e.g. a client's
        shared-memory segment) instead of a buffer of the store's own: the fused kernel then
        updates it in place and nothing is copied after a step. The current value moves in.

        CPU store only, and only while the store owns the value (one lender at a time):
        returns whether it did. :meth:`release` must come before ``storage`` goes away.
        """
        if self.xp is not np:
            return False
        with self.lock.shared():
            e = self.entry(name)
            with e.lock:
                if storage.size != e.size or e.size == 0 or not e.param.flags.owndata:
                    return False
                np.copyto(storage, e.param)
                e.param = storage
                return True

    def release(self, name: str, storage: np.ndarray) -> None:
        """Stop keeping ``name`` in ``storage``: its value moves into a buffer of our own."""
        with self.lock.shared():
            e = self._entries.get(name)
            if e is None:
                return
            with e.lock:
                if e.param is storage:
                    e.param = storage.copy()
                    # prepared launches still point into ``storage``
                    self._groups[e.group.id].drop_prepared()

    # -- iteration, lr ---------------------------------------------------------------------

    def end_iteration(self) -> int:
        with self.lock.exclusive():
            for opt in self._groups.values():
                opt.end_iteration()
            self.global_step += 1
            return self.global_step

    def set_lr(self, lr: float, group_id: str | None = None) -> list[str]:
        if not (math.isfinite(lr) and lr >= 0):  # also with no group to check it
            raise Invalid(f"Invalid learning rate: {lr}")
        with self.lock.exclusive():
            targets = self._select_groups(group_id)
            try:  # every group first: one that refuses leaves them all as they were
                for opt in targets.values():
                    opt.check_lr(lr)
            except ValueError as exc:
                raise Invalid(str(exc)) from None
            for opt in targets.values():
                opt.set_lr(lr)
            return list(targets)

    def set_hyperparams(self, group_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change a group's hyperparameters other than the lr (its state stays); returns
        them all. The group keeps its id: the id names the configuration it was created
        with, as a changed lr leaves it too."""
        with self.lock.exclusive():
            opt = self._select_groups(group_id)[group_id]
            try:
                opt.set_hyperparams(**changes)
            except (TypeError, ValueError, OverflowError) as exc:
                raise Invalid(str(exc)) from None
            return opt.hyperparams.to_dict()

    def _select_groups(self, group_id: str | None) -> dict[str, Optimizer]:
        if group_id is None:
            return dict(self._groups)
        if group_id not in self._groups:
            raise NotFound(f"group {group_id!r} does not exist")
        return {group_id: self._groups[group_id]}

    def lr_scale(self, name: str) -> float:
        e = self.entry(name)
        return self._groups[e.group.id].lr_scale(name)

    def set_lr_scale(self, name: str, scale: float) -> None:
        with self.lock.shared():
            e = self.entry(name)
            with e.lock:
                try:
                    self._groups[e.group.id].set_lr_scale(name, scale)
                except ValueError as exc:
                    raise Invalid(str(exc)) from None

    # -- inspection ------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._entries)

    def groups(self) -> list[dict[str, Any]]:
        return [
            {
                **g.to_dict(),
                "lr": self._groups[gid].lr,
                "current_hyperparams": self._groups[gid].hyperparams.to_dict(),
                "params": self._count(gid),
            }
            for gid, g in self._group_info.items()
        ]

    def effective_lr(self, name: str) -> float:
        """The lr a step of ``name`` uses: its group's lr times its lr_scale."""
        opt = self._groups[self.entry(name).group.id]
        return opt.lr * opt.lr_scale(name)

    def first_lr(self) -> float | None:
        """The lr of the run's first group (the one a run's history plots)."""
        opt = next(iter(list(self._groups.values())), None)
        return None if opt is None else opt.lr

    def _count(self, gid: str) -> int:
        return sum(1 for e in self._entries.values() if e.group.id == gid)

    def slots(self, name: str) -> dict[str, Any]:
        e = self.entry(name)
        opt = self._groups[e.group.id]
        return opt.state(name).slots if name in opt.names() else {}

    def state_bytes(self, name: str) -> int:
        return sum(int(s.nbytes) for s in self.slots(name).values())

    def device_bytes(self) -> int:
        return sum(int(e.param.nbytes) + self.state_bytes(e.name) for e in self._entries.values())

    @_on_device
    def read_slot(self, name: str, slot: str) -> np.ndarray:
        e = self.entry(name)
        with e.lock:
            slots = self.slots(name)
            if slot not in slots:
                raise NotFound(
                    f"parameter {name!r} has no state slot {slot!r} (slots: {sorted(slots)})"
                )
            return self._host(slots[slot])

    @_on_device
    def inspect(self, name: str) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
        """Host copies of the param and its slots, and its counters, taken atomically."""
        e = self.entry(name)
        with e.lock:
            param = self._host(e.param)
            opt = self._groups[e.group.id]
            # quantized state (8-bit codes) shown as the values it stands for
            slots = opt.algorithm.dequantized(
                np, {k: self._host(v) for k, v in self.slots(name).items()}
            )
            counters = {
                "version": e.version,
                "last_grad_norm": e.last_grad_norm,
                "last_update_norm": e.last_update_norm,
                "norms_at_version": e.norms_at_version,
            }
            counters["count"] = opt.state(name).count if name in opt.names() else None
        return param, slots, counters

    def _host(self, arr: Any) -> np.ndarray:
        """A host copy in the array's own dtype (float32; uint8 codes of 8-bit state)."""
        return np.array(arr.get() if hasattr(arr, "get") else arr, copy=True)

    def iter_entries(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    # Checkpoints, restores and state uploads (service/snapshots.py), on the stream too
    write_snapshot = _on_device(Snapshots.write_snapshot)
    restore = _on_device(Snapshots.restore)
    load_group_state = _on_device(Snapshots.load_group_state)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def committed_bytes(self) -> int:
        """The bytes every parameter, the state its algorithm allocates and its history
        commit."""
        return sum(
            committed_bytes(self._groups[e.group.id], e.shape)
            + (e.history.nbytes if e.history is not None else 0)
            for e in self.iter_entries()
        )

    @_on_device
    def group_state(self, group_id: str) -> tuple[dict[str, Any], dict[str, int]]:
        """A group's optimizer ``state_dict`` (host copies) and its parameters' versions."""
        with self.lock.shared():
            opt = self._groups.get(group_id)
            if opt is None:
                raise NotFound(f"group {group_id!r} does not exist")
            sd = opt.state_dict()
            versions = {e.name: e.version for e in self.iter_entries() if e.group.id == group_id}
        sd["global_step"] = self.global_step
        return sd, versions

    def clear(self) -> None:
        """Drop every parameter and all state (the run is being deleted); call holding the
        store's lock exclusively."""
        with self._meta:
            self._entries, self._groups, self._group_info = {}, {}, {}
            self.requests = RequestLog()


def _check_membership(
    what: str, have: Mapping[str, Any] | None, workers: Mapping[str, Any]
) -> None:
    """One membership per run: its options are one too (Conflict otherwise)."""
    if have is None:
        return
    want = membership_options(workers)
    for key in MEMBERSHIP_OPTIONS:
        if have[key] != want[key]:
            shared = "one worker count" if key == "count" else f"one {key}"
            raise Conflict(
                f"{what}: this server's sync groups have {key} {have[key]}; all sync "
                f"groups share {shared}, got {want[key]}"
            )


def _flat(xp: Any, g: np.ndarray) -> Any:
    """``g`` as a flat device array; a flat host array on a CPU store is used as it is."""
    return g if xp is np and g.ndim == 1 else xp.asarray(g).reshape(-1)


def _by_name(e: Entry) -> str:
    return e.name


def _norm(x: Any) -> float:
    return l2_norm(x)  # a device array is reduced on the device: one scalar comes back
