"""Distributed workers: synchronous rounds, staleness-bounded asynchronous steps, and who
has been seen.

A group's ``workers`` config is chosen at registration:

- ``{"mode": "plain"}`` (default): every gradient is applied on arrival; no worker ids.
- ``{"mode": "sync", "count": N, "timeout_s": T}``: the step of a parameter for iteration
  ``t`` completes when all N workers have sent their gradient for it. The server averages them
  (summed in worker-id order, so the result does not depend on arrival order), steps once, and
  every worker's call returns the same new parameter. A second gradient from one worker for
  the same iteration, or one for an iteration that is already done or not yet started, is a
  409 — unless it repeats the request id of the first (a retried delivery, see
  service/requests.py): that one joins the original's round and gets its reply, never
  counting twice. If the round is not complete within T seconds, every waiting call fails
  (504) and the state stays at the last completed step — never a partial average.
- ``{"mode": "async", "max_staleness": S}``: each gradient is applied when it arrives (under
  the parameter's lock, Hogwild-style across parameters); the client says which parameter
  version its gradient was computed from, and a gradient more than S versions behind is
  rejected (409), never down-weighted: a rejected gradient is visible to its sender, a
  down-weighted one silently changes the algorithm. Staleness is exported in /metrics.

Iterations: in a sync group each worker calls ``end_iteration`` with its id; the global step
advances when all N have (a barrier that does not block: the N-th call advances it).
"""

from __future__ import annotations

import asyncio
import contextlib
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

MODES = ("plain", "sync", "async")
T = TypeVar("T")
U = TypeVar("U")
V = TypeVar("V")
# How often a waiter looks at its deadline when nothing wakes it (a straggler timeout is
# noticed within this much of its due time).
_POLL_S = 0.25


def parse_workers(spec: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validate a group's workers config into its canonical form (ValueError on bad input)."""
    spec = dict(spec or {"mode": "plain"})
    mode = spec.pop("mode", "plain")
    if mode not in MODES:
        raise ValueError(f"Invalid workers mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "plain":
        if spec:
            raise ValueError(f"workers mode 'plain' takes no options, got {sorted(spec)}")
        return {"mode": "plain"}
    if mode == "sync":
        count, timeout_s = spec.pop("count", None), spec.pop("timeout_s", 60.0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"sync workers need count, an int >= 1; got {count!r}")
        if (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, (int, float))
            or not (0 < timeout_s <= 86400 and math.isfinite(timeout_s))
        ):
            raise ValueError(f"Invalid timeout_s value: {timeout_s!r} (seconds, in (0, 86400])")
        out = {"mode": "sync", "count": count, "timeout_s": float(timeout_s)}
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


@dataclass
class WorkerInfo:
    id: str
    first_seen: float
    last_seen: float
    gradients: int = 0


class WorkerRegistry:
    """Which workers the run has seen, and when: the newest ``capacity`` of them."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, WorkerInfo] = OrderedDict()

    def touch(self, worker: str, gradients: int = 0) -> None:
        now = time.time()
        with self._lock:
            info = self._seen.get(worker)
            if info is None:
                info = self._seen[worker] = WorkerInfo(worker, now, now)
                while len(self._seen) > self.capacity:  # the longest unseen goes first
                    self._seen.popitem(last=False)
            else:
                self._seen.move_to_end(worker)
            info.last_seen = now
            info.gradients += gradients

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [vars(i).copy() for i in self._seen.values()]


@dataclass
class _Round:
    iteration: int
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    outcome: StepOutcome | None = None
    error: Exception | None = None
    ids: list[tuple[str, str]] = field(default_factory=list)  # (request id, name) keys


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
        return cls(None, lambda: value)

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


class SyncRounds:
    """Per-parameter rounds of a sync group: collect N gradients, average, step once; and the
    iteration barrier of the run's sync workers.

    Joining a round or the barrier never waits (beyond a short lock): it returns a
    :class:`Waiting` that the caller waits on as it can — a thread (shm://) or the event
    loop (HTTP). Whoever completes a round or the barrier applies it in its own call.
    """

    def __init__(self, store: ParamStore) -> None:
        self.store = store
        self._cond = threading.Condition()
        self._listeners: set[Callable[[], None]] = set()  # event-loop waiters to wake
        self._rounds: dict[str, _Round] = {}
        self._done: dict[str, int] = {}  # name -> last completed iteration
        self._ended: dict[int, set[str]] = {}  # iteration -> workers that called end_iteration
        # (request id, name) -> the round that delivery joined while it runs, then its
        # outcome without the value (a StepOutcome) or its error: settled rounds keep no arrays
        self._requests = RequestLog()

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

    # -- rounds --------------------------------------------------------------------------

    def contribute(
        self,
        name: str,
        grad: np.ndarray,
        worker: str,
        iteration: int | None,
        cfg: Mapping,
        request_id: str | None = None,
    ) -> Waiting[StepOutcome]:
        """Join the round of ``name`` (completing it when this is the last gradient: the
        step runs here); the outcome comes once every worker has sent its gradient.
        ``request_id``: a repeat of a delivery already counted adds nothing; it waits for the
        round the first one joined and answers like it (the value is the current one)."""
        with self._cond:
            key = (request_id or "", name)
            seen = self._requests.get(key) if request_id is not None else None
            if seen is None:
                rnd = self._join(name, grad, worker, iteration, cfg)
                if request_id is not None:
                    rnd.ids.append(key)
                    self._requests.put(key, rnd)
                if len(rnd.grads) == cfg["count"]:
                    self._complete(name, rnd, cfg["count"])
                return self._waiting(name, rnd, cfg, replayed=False)
            if isinstance(seen, _Round):  # the first delivery's round is still running
                return self._waiting(name, seen, cfg, replayed=True)
            if isinstance(seen, Exception):
                raise seen
        # settled: read the value outside _cond (store.read takes the parameter's lock)
        return Waiting.done(replace(seen, param=self.store.read(name), replayed=True))

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

    def _join(
        self, name: str, grad: np.ndarray, worker: str, iteration: int | None, cfg: Mapping
    ) -> _Round:
        """Add ``worker``'s gradient to the round of ``name`` (holding ``_cond``)."""
        current = self.store.global_step + 1
        it = current if iteration is None else iteration
        if it <= self._done.get(name, 0):
            raise Conflict(f"{name!r}: iteration {it} is already done")
        if it != current:
            raise Conflict(f"{name!r}: iteration {it} has not started (the server is at {current})")
        rnd = self._rounds.get(name)
        if rnd is None or rnd.iteration != it:
            rnd = self._rounds[name] = _Round(it)
        if worker in rnd.grads:
            raise Conflict(
                f"{name!r}: worker {worker!r} already sent its gradient for iteration {it}"
            )
        # float32, whatever precision it came in (widening is exact): the average is float32
        rnd.grads[worker] = np.array(widen(np, grad), dtype=np.float32, copy=True).reshape(-1)
        return rnd

    def _waiting(
        self, name: str, rnd: _Round, cfg: Mapping, replayed: bool
    ) -> Waiting[StepOutcome]:
        """What a contribution to ``rnd`` waits on: its outcome, or its error."""
        deadline = time.monotonic() + cfg["timeout_s"]

        def check() -> StepOutcome | None:  # holding _cond
            if rnd.outcome is None and rnd.error is None:
                if time.monotonic() < deadline or self._rounds.get(name) is not rnd:
                    return None  # still open, or being applied: its outcome is moments away
                rnd.error = StragglerTimeout(
                    f"{name!r}: straggler timeout after {cfg['timeout_s']} s at iteration "
                    f"{rnd.iteration}: {len(rnd.grads)} of {cfg['count']} workers sent a "
                    f"gradient ({', '.join(sorted(rnd.grads))}); nothing was applied"
                )
                del self._rounds[name]
                self._settle(rnd)
                self._notify()
            if rnd.error is not None:
                raise rnd.error
            assert rnd.outcome is not None
            return replace(rnd.outcome, replayed=True) if replayed else rnd.outcome

        return Waiting(self, check)

    def _complete(self, name: str, rnd: _Round, count: int) -> None:
        """Average and step; called holding ``_cond``, which it releases around the step so
        other parameters' rounds go on meanwhile."""
        total = np.zeros_like(next(iter(rnd.grads.values())))
        for worker in sorted(rnd.grads):  # a fixed order: the same bits whoever came first
            total += rnd.grads[worker]
        total /= np.float32(count)
        previous = self._done.get(name, 0)
        self._done[name] = rnd.iteration  # late duplicates now see "already done"
        del self._rounds[name]
        outcome: StepOutcome | None = None
        error: Exception | None = None
        self._cond.release()
        try:
            [outcome] = self.store.step({name: total}, read_back=True)
        except Exception as exc:  # e.g. a non-finite average: every waiter gets the error
            error = exc
        finally:
            self._cond.acquire()
        if error is not None:
            self._done[name] = previous
        rnd.outcome, rnd.error = outcome, error
        self._settle(rnd)
        self._notify()

    # -- the iteration barrier -----------------------------------------------------------

    def end_iteration(self, worker: str, count: int, timeout_s: float) -> int | Waiting[int]:
        """A barrier: the last of ``count`` workers to call it advances the global step here
        and gets the new step at once; the others get a :class:`Waiting` for it."""
        with self._cond:
            current = self.store.global_step + 1
            ended = self._ended.setdefault(current, set())
            if worker in ended:
                raise Conflict(f"worker {worker!r} already ended iteration {current}")
            ended.add(worker)
            if len(ended) == count:
                del self._ended[current]
                step = self.store.end_iteration()
                self._notify()
                return step
        deadline = time.monotonic() + timeout_s

        def check() -> int | None:  # holding _cond
            if self.store.global_step >= current:
                return self.store.global_step
            if time.monotonic() < deadline:
                return None
            ended.discard(worker)
            raise StragglerTimeout(
                f"straggler timeout after {timeout_s} s ending iteration {current}: "
                f"{len(ended) + 1} of {count} workers arrived; the step did not advance"
            )

        return Waiting(self, check)
