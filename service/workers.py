"""Distributed workers: synchronous rounds, staleness-bounded asynchronous steps, and who
has been seen.

A group's ``workers`` config is chosen at registration:

- ``{"mode": "plain"}`` (default): every gradient is applied on arrival; no worker ids.
- ``{"mode": "sync", "count": N, "timeout_s": T, "lease_s": L, "clip_grad_norm": C}``
  (all but the mode optional): the run's sync workers form a *membership* and go through
  iterations together. The step of a parameter for iteration ``t`` completes when every
  member of ``t`` has either sent its gradient for it or ended the iteration without it
  (a parameter it did not use: DDP's ``find_unused_parameters`` case). The server averages
  the gradients it got over their senders (summed in worker-id order, so the result does not
  depend on arrival order), steps once, and every sender's call returns the same new
  parameter. A second gradient from one worker for the same iteration, or one for an
  iteration that is already done or not yet started, is a 409 — unless it repeats the
  request id of the first (a retried delivery, see service/requests.py): that one joins the
  original's round and gets its reply, never counting twice. If a round is not complete
  within T seconds, every waiting call fails (504) and the state stays at the last
  completed step — never a partial average.
- ``{"mode": "async", "max_staleness": S}``: each gradient is applied when it arrives (under
  the parameter's lock, Hogwild-style across parameters); the client says which parameter
  version its gradient was computed from, and a gradient more than S versions behind is
  rejected, never down-weighted: a rejected gradient is visible to its sender, a
  down-weighted one silently changes the algorithm. The rejection is a reply, not an error
  (the engine's ``StepOutcome.stale``): it carries the current values and versions, so the
  worker continues from them. Staleness is exported in /metrics.

Membership (elastic sync). Workers join and leave *between* iterations; the membership of an
iteration is fixed when it starts (its first gradient or end_iteration; with ``count``, not
before N workers are members: ``count`` is the minimum to start an iteration, not a fixed
size). A worker that is not a member when the iteration starts is one from the next (its
``join`` waits until then). With ``lease_s`` L, each member holds a lease of L seconds
(without it, none: a member stays until it leaves, and a missing one fails the round after
``timeout_s``), renewed by every request it makes — a step, end_iteration, a heartbeat,
and while it waits in a round or the barrier; a member whose lease runs out is *dropped*:
the rounds and the barrier go on without it, the replies name it, and it may join again
(from the next iteration). Leaving takes effect at once: what the worker sent in this
iteration counts, nothing else waits for it. The options that concern the membership
(``count``, ``lease_s``, ``clip_grad_norm``) are the run's: all its sync groups share them.

Global gradient-norm clipping (``clip_grad_norm``: the max norm): the rounds of an iteration
are applied together, once every member has sent its gradients (with clipping, a worker's
gradients of an iteration come in one step request, as DDP reduces them after one backward)
or ended the iteration; the norm is taken over the averaged gradients of every sync
parameter of the iteration, and if it exceeds C every one is scaled by C / (norm + 1e-6), as
``torch.nn.utils.clip_grad_norm_`` does, before the step.

Iterations: in a sync group each worker calls ``end_iteration`` with its id; the global step
advances when every member has (a barrier that does not block: the call that completes it
advances it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import numpy as np

from stepd.wire import widen

from .errors import Conflict, StragglerTimeout
from .requests import RequestLog

if TYPE_CHECKING:
    from .entries import StepOutcome
    from .store import ParamStore

log = logging.getLogger("stepd")

MODES = ("plain", "sync", "async")
T = TypeVar("T")
U = TypeVar("U")
V = TypeVar("V")
# How often a waiter looks at its deadline when nothing wakes it (a straggler timeout is
# noticed within this much of its due time), and how often leases are checked.
_POLL_S = 0.25
# A sync member's lease by default: none. A member stays until it leaves, as a fixed-size
# round always kept everyone (a backward pass may take minutes with nothing sent); with
# ``lease_s`` set, one not heard from within it is dropped and the rest go on.
LEASE_S: float | None = None
# The sync options that concern the membership: one per run, shared by its sync groups.
MEMBERSHIP_OPTIONS = ("count", "lease_s", "clip_grad_norm")
_DROPPED_KEPT = 64  # iterations whose dropped workers are remembered (for late replies)


def _seconds(what: str, value: Any, default: float | None) -> Any:
    value = default if value is None else value
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (0 < value <= 86400 and math.isfinite(value))
    ):
        raise ValueError(f"Invalid {what} value: {value!r} (seconds, in (0, 86400])")
    return float(value)


def parse_workers(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a group's workers config into its canonical form (ValueError on bad input).

    Sync options added since the first release (``lease_s``, ``clip_grad_norm``) appear only
    when they differ from their defaults, and ``count`` only when given: a group's id is a
    hash of this form, and the ids of existing groups (and their checkpoints) stay valid."""
    spec = dict(spec or {"mode": "plain"})
    mode = spec.pop("mode", "plain")
    if mode not in MODES:
        raise ValueError(f"Invalid workers mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "plain":
        if spec:
            raise ValueError(f"workers mode 'plain' takes no options, got {sorted(spec)}")
        return {"mode": "plain"}
    if mode == "sync":
        count = spec.pop("count", None)
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, int) or count < 1
        ):
            raise ValueError(
                f"sync workers' count (the members an iteration needs to start) is an int >= 1 "
                f"or null; got {count!r}"
            )
        out: dict[str, Any] = {"mode": "sync"}
        if count is not None:
            out["count"] = count
        out["timeout_s"] = _seconds("timeout_s", spec.pop("timeout_s", None), 60.0)
        lease_s = _seconds("lease_s", spec.pop("lease_s", None), LEASE_S)
        if lease_s is not None:
            out["lease_s"] = lease_s
        clip = spec.pop("clip_grad_norm", None)
        if clip is not None:
            if (
                isinstance(clip, bool)
                or not isinstance(clip, (int, float))
                or not (clip > 0 and math.isfinite(clip))
            ):
                raise ValueError(f"Invalid clip_grad_norm value: {clip!r} (a max norm > 0)")
            out["clip_grad_norm"] = float(clip)
    else:
        staleness = spec.pop("max_staleness", None)
        if staleness is not None and (
            isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0
        ):
            raise ValueError(f"Invalid max_staleness value: {staleness!r} (an int >= 0 or null)")
        out = {"mode": "async", "max_staleness": staleness}
    if spec:
        raise ValueError(f"unknown workers option(s) {sorted(spec)} for mode {mode!r}")
    return out


def membership_options(workers: Mapping[str, Any]) -> dict[str, Any]:
    """A sync group's membership options, defaults filled in (see MEMBERSHIP_OPTIONS)."""
    return {
        "count": workers.get("count"),
        "lease_s": workers.get("lease_s", LEASE_S),
        "clip_grad_norm": workers.get("clip_grad_norm"),
    }


@dataclass
class WorkerInfo:
    id: str
    first_seen: float
    last_seen: float
    gradients: int = 0
    accepted: int = 0  # gradients applied (or averaged into a sync step)
    refused: int = 0  # gradients not applied: stale (async) or non-finite
    staleness: int | None = None  # async: the most versions its last step's gradients lagged


class WorkerRegistry:
    """Which workers the run has seen, and when: the newest ``capacity`` of them."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, WorkerInfo] = OrderedDict()

    def touch(self, worker: str, gradients: int = 0) -> None:
        with self._lock:
            self._touch(worker, gradients)

    def record(self, worker: str, outcomes: Sequence[StepOutcome]) -> None:
        """``worker`` sent a step; what became of each of its gradients. A replayed request
        counts once: when it was applied."""
        fresh = [o for o in outcomes if not o.replayed]
        lags = [o.staleness for o in fresh if o.staleness is not None]
        ok = sum(o.applied for o in fresh)
        with self._lock:
            info = self._touch(worker, len(outcomes))
            info.accepted += ok
            info.refused += len(fresh) - ok
            if lags:
                info.staleness = max(lags)

    def _touch(self, worker: str, gradients: int) -> WorkerInfo:
        """``worker`` seen now (the lock held): its record, made if new."""
        now = time.time()
        info = self._seen.get(worker)
        if info is None:
            info = self._seen[worker] = WorkerInfo(worker, now, now)
            while len(self._seen) > self.capacity:  # the longest unseen goes first
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(worker)
        info.last_seen = now
        info.gradients += gradients
        return info

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [vars(i).copy() for i in self._seen.values()]


@dataclass
class _Round:
    iteration: int
    timeout_s: float
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    outcome: StepOutcome | None = None
    error: Exception | None = None
    ids: list[tuple[str, str]] = field(default_factory=list)  # (request id, name) keys


@dataclass(frozen=True)
class Membership:
    """The sync membership of a run, as a call sees it."""

    iteration: int  # the iteration now running (the global step + 1)
    members: tuple[str, ...]  # its members (growing until it starts: ``started``)
    joining: tuple[str, ...]  # members from the next iteration on
    started: bool  # the membership of ``iteration`` is fixed
    dropped: tuple[str, ...]  # dropped from ``iteration`` (their lease ran out)
    count: int | None  # the members an iteration needs to start
    lease_s: float
    member_from: int | None = None  # join: the first iteration the caller is a member of

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k != "member_from" or v is not None}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass(frozen=True)
class Advance:
    """An ended iteration: the new global step, and who was dropped from the iteration."""

    step: int
    dropped: tuple[str, ...] = ()


class Waiting(Generic[T]):
    """A result that may still wait for other workers (a sync round or the iteration
    barrier): :meth:`wait` blocks the calling thread, :meth:`wait_async` waits on the event
    loop without holding a thread — so an HTTP server can keep hundreds of workers waiting
    on one round. Both give the same result or raise the same error."""

    __slots__ = ("_check", "_rounds")

    def __init__(self, rounds: SyncRounds | None, check: Callable[[], T | None]) -> None:
        # ``check`` runs holding the rounds' lock: the result once there, None meanwhile;
        # at its deadline it settles the wait (a straggler timeout) itself.
        self._rounds, self._check = rounds, check

    @classmethod
    def done(cls, value: T) -> Waiting[T]:
        return _Done(value)

    def then(self, fn: Callable[[T], V]) -> Waiting[V]:
        """``fn`` of the result, once there."""
        check = self._check

        def mapped() -> V | None:
            result = check()
            return None if result is None else fn(result)

        return Waiting(self._rounds, mapped)

    @classmethod
    def gather(
        cls, rounds: SyncRounds, waits: Sequence[Waiting[U]], finish: Callable[[list[U]], T]
    ) -> Waiting[T]:
        """``finish`` of every result, once all are in (the first error, as soon as seen)."""
        results: list[U] = []

        def check() -> T | None:
            while len(results) < len(waits):
                result = waits[len(results)]._check()
                if result is None:
                    return None
                results.append(result)
            return finish(results)

        return cls(rounds, check)

    def wait(self) -> T:
        if self._rounds is None:
            return cast(T, self._check())
        return self._rounds.block(self._check)

    async def wait_async(self) -> T:
        if self._rounds is None:
            return cast(T, self._check())
        return await self._rounds.block_async(self._check)


class _Done(Waiting[T]):
    """A result that is there already (every plain step): no closure to build or call."""

    __slots__ = ("_value",)

    def __init__(self, value: T) -> None:
        self._rounds, self._value = None, value

    def _check(self) -> T:  # what gather() asks of each wait
        return self._value

    def wait(self) -> T:
        return self._value

    async def wait_async(self) -> T:
        return self._value


class SyncRounds:
    """Per-parameter rounds of a run's sync groups, the membership that takes part in them,
    and the iteration barrier.

    Joining a round or the barrier never waits (beyond a short lock): it returns a
    :class:`Waiting` that the caller waits on as it can — a thread (shm://) or the event
    loop (HTTP). Whoever completes a round or the barrier applies it in its own call (a
    lease running out is noticed by a keeper thread, which then does the same).
    ``options()`` gives the run's membership options (:func:`membership_options`);
    ``on_advance(step)`` is called, outside every lock, when the global step advances other
    than in an ``end_iteration`` call (whose caller handles it: autosaves).
    """

    def __init__(
        self,
        store: ParamStore,
        options: Callable[[], Mapping[str, Any]] | None = None,
        on_advance: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self._options = options or (lambda: membership_options({}))
        self._on_advance = on_advance
        self._cond = threading.Condition()
        self._listeners: set[Callable[[], None]] = set()  # event-loop waiters to wake
        self._rounds: dict[str, _Round] = {}
        self._done: dict[str, int] = {}  # name -> last completed iteration
        # (request id, name) -> the round that delivery joined while it runs, then its
        # outcome without the value (a StepOutcome) or its error: settled rounds keep no arrays
        self._requests = RequestLog()
        # The membership of the running iteration. Until it starts (its first gradient or
        # end_iteration, once it has ``count`` members) workers join it directly; after,
        # they join the next one.
        self._members: set[str] = set()
        self._started = False
        self._active = False  # a gradient or an end_iteration came for this iteration
        self._ended: set[str] = set()  # members that called end_iteration
        self._sent: set[str] = set()  # with clipping: members whose gradients are all in
        self._joining: set[str] = set()  # members from the next iteration
        self._seen: dict[str, float] = {}  # lease holders (members, joining) -> last heard
        self._dropped: OrderedDict[str, int] = OrderedDict()  # worker -> iteration it left
        self._dropped_now: set[str] = set()  # dropped from the running iteration
        self._dropped_in: OrderedDict[int, tuple[str, ...]] = OrderedDict()  # ended iterations
        self._applying = 0  # rounds being stepped right now (the lock released meanwhile)
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def close(self) -> None:
        """The run is gone (or restored): the lease keeper stops."""
        self._stop.set()

    # -- waiting -------------------------------------------------------------------------

    def _notify(self) -> None:
        """Something settled (holding ``_cond``): wake every waiter, threads and loops."""
        self._cond.notify_all()
        for wake in list(self._listeners):
            wake()

    def block(self, check: Callable[[], T | None]) -> T:
        with self._cond:
            while (result := check()) is None:
                self._cond.wait(_POLL_S)
            return result

    async def block_async(self, check: Callable[[], T | None]) -> T:
        loop = asyncio.get_running_loop()
        while True:
            woken = asyncio.Event()

            def wake(woken: asyncio.Event = woken) -> None:
                with contextlib.suppress(RuntimeError):  # the loop has closed
                    loop.call_soon_threadsafe(woken.set)

            with self._cond:  # held briefly by everyone: never across a step or a wait
                if (result := check()) is not None:
                    return result
                self._listeners.add(wake)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), _POLL_S)
            finally:
                with self._cond:
                    self._listeners.discard(wake)

    def _advanced(self, step: int | None) -> None:
        """Tell the run that the step advanced outside an end_iteration call (no lock held)."""
        if step is not None and self._on_advance is not None:
            try:
                self._on_advance(step)
            except Exception:  # an autosave's failure is the run's to report, not this call's
                log.exception("after advancing to step %d", step)

    # -- membership ----------------------------------------------------------------------

    def _current(self) -> int:
        return self.store.global_step + 1

    def _min_count(self, opts: Mapping[str, Any]) -> int:
        return opts["count"] or 1

    def _renew(self, worker: str) -> None:
        """``worker`` was heard from: its lease starts again (holding ``_cond``)."""
        if worker in self._members or worker in self._joining:
            self._seen[worker] = time.monotonic()

    def _add_member(self, worker: str) -> None:
        self._members.add(worker)
        self._lease(worker)

    def _lease(self, worker: str) -> None:
        """``worker`` holds a lease from now (a member, or one joining the next iteration)."""
        self._dropped.pop(worker, None)
        self._seen[worker] = time.monotonic()
        if self._options()["lease_s"] is None:
            return  # no lease to keep
        if self._keeper is None and not self._stop.is_set():
            self._keeper = threading.Thread(target=self._keep, name="stepd-leases", daemon=True)
            self._keeper.start()

    def _maybe_start(self, opts: Mapping[str, Any]) -> None:
        """The iteration starts (its membership is fixed) once it has had activity and has
        enough members."""
        if not self._started and self._active and len(self._members) >= self._min_count(opts):
            self._started = True

    def _admit(self, worker: str, opts: Mapping[str, Any]) -> None:
        """``worker`` acts in the running iteration (a gradient, end_iteration): a member, or
        one joining it now if it has not started (holding ``_cond``)."""
        if worker in self._members:
            self._renew(worker)
        elif not self._started:
            self._joining.discard(worker)
            self._add_member(worker)
        else:
            raise Conflict(self._not_member(worker))
        self._active = True
        self._maybe_start(opts)

    def _not_member(self, worker: str) -> str:
        current = self._current()
        if worker in self._dropped:
            return (
                f"worker {worker!r} was dropped from iteration {self._dropped[worker]} (nothing "
                f"heard from it within its lease of {self._options()['lease_s']} s): join again "
                "to be a member from the next iteration"
            )
        if worker in self._joining:
            return (
                f"worker {worker!r} is a member from iteration {current + 1}: iteration "
                f"{current} started without it (join returns when it may send)"
            )
        return (
            f"worker {worker!r} is not a member of iteration {current}, which started with "
            f"{sorted(self._members)}: join first (it becomes a member from the next iteration)"
        )

    def _membership(self, member_from: int | None = None) -> Membership:
        opts = self._options()
        current = self._current()
        return Membership(
            current,
            tuple(sorted(self._members)),
            tuple(sorted(self._joining)),
            self._started,
            self._dropped_from(current),
            opts["count"],
            opts["lease_s"],
            member_from,
        )

    def _dropped_from(self, iteration: int) -> tuple[str, ...]:
        if iteration == self._current():
            return tuple(sorted(self._dropped_now))
        return self._dropped_in.get(iteration, ())

    def membership(self) -> Membership:
        with self._cond:
            return self._membership()

    def join(self, worker: str, timeout_s: float) -> Membership | Waiting[Membership]:
        """Make ``worker`` a member: of the running iteration if it has not started, else of
        the next one — then the result waits until that one begins (a 504 after
        ``timeout_s``; the worker stays joining while its lease lasts)."""
        with self._cond:
            if worker in self._members:
                self._renew(worker)
                return self._membership(self._current())
            if not self._started:
                self._joining.discard(worker)
                self._add_member(worker)
                self._maybe_start(self._options())
                return self._membership(self._current())
            self._joining.add(worker)
            self._lease(worker)
            target = self._current() + 1
        deadline = time.monotonic() + timeout_s

        def check() -> Membership | None:  # holding _cond
            if worker in self._members:  # from ``target``, or earlier (see _progress)
                return self._membership(min(target, self._current()))
            if worker not in self._joining:  # its lease ran out, or it left meanwhile
                raise Conflict(self._not_member(worker))
            self._renew(worker)
            if time.monotonic() < deadline:
                return None
            raise StragglerTimeout(
                f"join: iteration {target - 1} did not end within {timeout_s} s; worker "
                f"{worker!r} stays joining while its lease lasts (join again to wait on)"
            )

        return Waiting(self, check)

    def heartbeat(self, worker: str) -> Membership:
        """``worker`` is alive: its lease starts again (one that is not a member joins the
        running iteration if it has not started; else 409, it must join)."""
        with self._cond:
            if worker not in self._members and worker not in self._joining:
                if self._started:
                    raise Conflict(self._not_member(worker))
                self._add_member(worker)
            self._renew(worker)
            return self._membership()

    def leave(self, worker: str) -> Membership:
        """``worker`` leaves now: what it sent in this iteration counts, and no round or
        barrier waits for it any more. Leaving twice is harmless."""
        with self._cond:
            self._joining.discard(worker)
            self._seen.pop(worker, None)
            self._members.discard(worker)
            self._ended.discard(worker)
            self._sent.discard(worker)
            advanced = self._progress()
            self._notify()
            info = self._membership()
        self._advanced(advanced)
        return info

    def _keep(self) -> None:
        """The lease keeper: drops members (and joiners) whose lease ran out, then completes
        what no longer waits for them. Runs while anyone holds a lease."""
        while not self._stop.wait(_POLL_S):
            with self._cond:
                if not self._seen:
                    self._keeper = None
                    return
                advanced = self._expire()
            self._advanced(advanced)
        with self._cond:
            self._keeper = None

    def _expire(self) -> int | None:
        """Drop every lease holder not heard from within the lease (holding ``_cond``)."""
        lease = self._options()["lease_s"]
        if lease is None:  # members stay until they leave
            return None
        now = time.monotonic()
        expired = [w for w, seen in self._seen.items() if now - seen > lease]
        if not expired:
            return None
        current = self._current()
        for worker in expired:
            del self._seen[worker]
            self._joining.discard(worker)
            if worker in self._members:
                self._members.discard(worker)
                self._ended.discard(worker)
                self._sent.discard(worker)
                self._dropped[worker] = current
                self._dropped.move_to_end(worker)
                self._dropped_now.add(worker)
                while len(self._dropped) > 4096:
                    self._dropped.popitem(last=False)
                log.warning(
                    "sync worker %s dropped from iteration %d: nothing heard for %.1f s",
                    worker,
                    current,
                    lease,
                )
        advanced = self._progress()
        self._notify()
        return advanced

    # -- rounds --------------------------------------------------------------------------

    def contribute(
        self,
        grads: Mapping[str, np.ndarray],
        worker: str,
        iteration: int | None,
        timeouts: Mapping[str, float],
        request_id: str | None = None,
        last: bool = False,
    ) -> list[Waiting[StepOutcome]]:
        """Join the rounds of ``grads`` (completing those that this makes complete: their
        step runs here); each outcome comes once its round is complete, in ``grads``' order.
        ``last``: these are the worker's last gradients of the iteration, so the rounds of
        parameters it did not use need not wait for its end_iteration (with clipping, every
        step is its last).
        ``request_id``: a repeat of a delivery already counted adds nothing; it waits for the
        round the first one joined and answers like it (the value is the current one)."""
        settled: dict[str, StepOutcome] = {}
        advanced: int | None = None
        with self._cond:
            opts = self._options()
            clip = opts["clip_grad_norm"] is not None
            seen = {
                name: self._requests.get((request_id, name))
                for name in grads
                if request_id is not None
            }
            fresh = [name for name in grads if seen.get(name) is None]
            rounds: dict[str, _Round] = {}
            if fresh:
                it = self._check(fresh, worker, iteration, clip)
                self._admit(worker, opts)
                for name in fresh:
                    rnd = self._rounds.get(name)
                    if rnd is None or rnd.iteration != it:
                        rnd = self._rounds[name] = _Round(it, timeouts[name])
                    # float32, whatever precision it came in (widening is exact)
                    g = np.array(widen(np, grads[name]), dtype=np.float32, copy=True)
                    rnd.grads[worker] = g.reshape(-1)
                    if request_id is not None:
                        key = (request_id, name)
                        rnd.ids.append(key)
                        self._requests.put(key, rnd)
                    rounds[name] = rnd
                if clip or last:
                    self._sent.add(worker)
                advanced = self._progress()
            checks: dict[str, Callable[[], StepOutcome | None]] = {}
            for name in grads:
                if name in rounds:
                    checks[name] = self._round_check(name, rounds[name], worker, replayed=False)
                    continue
                before = seen[name]
                if isinstance(before, _Round):  # the first delivery's round is still running
                    checks[name] = self._round_check(name, before, worker, replayed=True)
                elif isinstance(before, Exception):
                    raise before
                else:
                    settled[name] = cast("StepOutcome", before)
        self._advanced(advanced)
        out: list[Waiting[StepOutcome]] = []
        for name in grads:
            if name in settled:  # read outside _cond (store.read takes the parameter's lock)
                value = self.store.read(name)
                out.append(Waiting.done(replace(settled[name], param=value, replayed=True)))
            else:
                out.append(Waiting(self, checks[name]))
        return out

    def _check(self, names: list[str], worker: str, iteration: int | None, clip: bool) -> int:
        """Refuse a contribution before anything changes (holding ``_cond``); its iteration."""
        current = self._current()
        it = current if iteration is None else iteration
        for name in names:
            if it <= self._done.get(name, 0):
                raise Conflict(f"{name!r}: iteration {it} is already done")
        if it != current:
            raise Conflict(
                f"{names[0]!r}: iteration {it} has not started (the server is at {current})"
            )
        if worker in self._ended:
            raise Conflict(f"worker {worker!r} already ended iteration {it}")
        if worker in self._sent:
            raise Conflict(
                f"worker {worker!r} already sent its last gradients for iteration {it}"
                + (
                    ": with clip_grad_norm, an iteration's gradients come in one step"
                    if clip
                    else ""
                )
            )
        for name in names:
            rnd = self._rounds.get(name)
            if rnd is not None and rnd.iteration == it and worker in rnd.grads:
                raise Conflict(
                    f"{name!r}: worker {worker!r} already sent its gradient for iteration {it}"
                )
        return it

    def _round_check(
        self, name: str, rnd: _Round, worker: str, replayed: bool
    ) -> Callable[[], StepOutcome | None]:
        """What a contribution to ``rnd`` waits on: its outcome, or its error."""
        deadline = time.monotonic() + rnd.timeout_s

        def check() -> StepOutcome | None:  # holding _cond
            if rnd.outcome is None and rnd.error is None:
                self._renew(worker)  # waiting is being alive
                if time.monotonic() < deadline or self._rounds.get(name) is not rnd:
                    return None  # still open, or being applied: its outcome is moments away
                self._time_out(name, rnd)
            if rnd.error is not None:
                raise rnd.error
            assert rnd.outcome is not None
            return replace(rnd.outcome, replayed=True) if replayed else rnd.outcome

        return check

    def _expected(self) -> int:
        """How many members the running iteration has (or needs, before it starts)."""
        if self._started:
            return len(self._members)
        return max(self._options()["count"] or 0, len(self._members))

    def _time_out(self, name: str, rnd: _Round) -> None:
        """The round is overdue: it fails, and with clipping every open round of its
        iteration with it (they are applied together or not at all)."""
        missing = sorted(self._members - set(rnd.grads) - self._ended - self._sent)
        error = StragglerTimeout(
            f"{name!r}: straggler timeout after {rnd.timeout_s} s at iteration "
            f"{rnd.iteration}: {len(rnd.grads)} of {self._expected()} workers sent a gradient "
            f"({', '.join(sorted(rnd.grads))})"
            + (f", waiting for {', '.join(missing)}" if missing else "")
            + "; nothing was applied"
        )
        failed = [(name, rnd)]
        if self._options()["clip_grad_norm"] is not None:
            failed = [(n, r) for n, r in self._rounds.items() if r.iteration == rnd.iteration]
        for _, r in failed:  # nothing they sent was applied: they may send it again
            self._sent -= set(r.grads)
        for n, r in failed:
            r.error = error
            del self._rounds[n]
            self._settle(r)
        self._notify()

    def _settle(self, rnd: _Round) -> None:
        """A round is over: its deliveries' ids now map to the outcome, minus the arrays."""
        done: StepOutcome | Exception
        if rnd.error is not None:
            done = rnd.error
        else:
            assert rnd.outcome is not None  # a round ends with its outcome or its error
            done = replace(rnd.outcome, param=None)
        for key in rnd.ids:
            self._requests.put(key, done)

    def _ready(self) -> list[tuple[str, _Round]]:
        """The rounds of the running iteration that have all they will get (holding
        ``_cond``): every member sent its gradient or ended the iteration (with clipping: all
        of them, once every member has sent or ended)."""
        if not self._started:
            return []
        current = self._current()
        open_ = [(n, r) for n, r in self._rounds.items() if r.iteration == current]
        if self._options()["clip_grad_norm"] is not None:
            return open_ if self._members <= (self._sent | self._ended) else []
        done = self._ended | self._sent
        return [(n, r) for n, r in open_ if all(m in r.grads or m in done for m in self._members)]

    def _progress(self) -> int | None:
        """Apply what is complete, then advance the iteration if its barrier is complete
        (holding ``_cond``, released around steps). The new step, if this call advanced it."""
        while ready := self._ready():
            if self._options()["clip_grad_norm"] is not None:
                self._apply(ready)
            else:
                self._apply(ready[:1])
        advanced = self._maybe_advance()
        if advanced is None and self._started and not self._active and not self._members:
            # Every member left (or was dropped) before the iteration had any activity: it
            # never began, so those joining are its members — nobody else could end it.
            self._members, self._joining = set(self._joining), set()
            self._maybe_start_next()
            self._notify()
        return advanced

    def _apply(self, rounds: list[tuple[str, _Round]]) -> None:
        """Average each round over its senders (with clipping: scale them all by the global
        norm) and step them in one call; the lock is released around the step so that other
        rounds go on meanwhile."""
        iteration = rounds[0][1].iteration
        averaged: dict[str, np.ndarray] = {}
        for name, rnd in rounds:
            total = np.zeros_like(next(iter(rnd.grads.values())))
            for worker in sorted(rnd.grads):  # a fixed order: the same bits whoever came first
                total += rnd.grads[worker]
            total /= np.float32(len(rnd.grads))
            averaged[name] = total
        max_norm = self._options()["clip_grad_norm"]
        if max_norm is not None:
            _clip(averaged, max_norm)
        previous = {name: self._done.get(name, 0) for name, _ in rounds}
        for name, _ in rounds:
            self._done[name] = iteration  # late duplicates now see "already done"
            del self._rounds[name]
        self._applying += 1
        outcomes: list[StepOutcome] = []
        error: Exception | None = None
        self._cond.release()
        try:
            outcomes = self.store.step(averaged, read_back=True)
        except Exception as exc:  # e.g. a non-finite average: every waiter gets the error
            error = exc
        finally:
            self._cond.acquire()
            self._applying -= 1
        dropped = self._dropped_from(iteration)
        by_name = {o.name: o for o in outcomes}
        for name, rnd in rounds:
            if error is not None:
                self._done[name] = previous[name]
                rnd.error = error
            else:
                rnd.outcome = replace(by_name[name], dropped=dropped)
            self._settle(rnd)
        self._notify()

    # -- the iteration barrier -----------------------------------------------------------

    def _maybe_advance(self) -> int | None:
        """Advance the global step if every member has ended the running iteration and no
        round of it is being applied (holding ``_cond``). The new step, if it did."""
        if not (self._started and self._active) or self._applying:
            return None
        if not self._members <= self._ended:
            return None
        current = self._current()
        if any(r.iteration == current for r in self._rounds.values()):
            return None
        step = self.store.end_iteration()
        self._dropped_in[current] = tuple(sorted(self._dropped_now))
        self._dropped_now.clear()
        while len(self._dropped_in) > _DROPPED_KEPT:
            self._dropped_in.popitem(last=False)
        # the next iteration: this one's members, and those who joined meanwhile
        self._members |= self._joining
        self._joining.clear()
        self._ended.clear()
        self._sent.clear()
        self._active = False
        self._started = False
        self._maybe_start_next()
        self._notify()
        return step

    def _maybe_start_next(self) -> None:
        """A new iteration starts with the members it has, if they are enough: a round's
        size is the membership at its start."""
        opts = self._options()
        self._started = bool(self._members) and len(self._members) >= self._min_count(opts)

    def end_iteration(self, worker: str, timeout_s: float) -> Advance | Waiting[Advance]:
        """A barrier: the call that completes it (the last member's) advances the global
        step here and gets the new step at once; the others get a :class:`Waiting` for it.
        Ending an iteration also completes the rounds that waited only for this worker (the
        parameters it did not use)."""
        with self._cond:
            current = self._current()
            if worker in self._ended:
                raise Conflict(f"worker {worker!r} already ended iteration {current}")
            self._admit(worker, self._options())
            self._ended.add(worker)
            advanced = self._progress()
            if advanced is not None:
                return Advance(advanced, self._dropped_from(current))
        deadline = time.monotonic() + timeout_s

        def check() -> Advance | None:  # holding _cond
            if self.store.global_step >= current:
                return Advance(current, self._dropped_from(current))
            self._renew(worker)
            if time.monotonic() < deadline:
                return None
            self._ended.discard(worker)
            waiting = sorted(self._members - self._ended - {worker})
            raise StragglerTimeout(
                f"straggler timeout after {timeout_s} s ending iteration {current}: "
                f"{len(self._ended) + 1} of {self._expected()} workers arrived"
                + (f" (waiting for {', '.join(waiting)})" if waiting else "")
                + "; the step did not advance"
            )

        return Waiting(self, check)


def _clip(grads: Mapping[str, np.ndarray], max_norm: float) -> None:
    """Scale ``grads`` in place so their global L2 norm is at most ``max_norm``, as
    ``torch.nn.utils.clip_grad_norm_`` does (coefficient max_norm / (norm + 1e-6), capped at
    1). A non-finite norm leaves them as they are: the store's non-finite policy decides."""
    total = math.sqrt(
        sum(float(np.dot(g.astype(np.float64), g.astype(np.float64))) for g in grads.values())
    )
    if not math.isfinite(total):
        return
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= np.float32(coef)
