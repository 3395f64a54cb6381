"""The server's engine: every operation of stepd, implemented once, over its runs.

The adapters (the HTTP routers in ``service/api``, the shared-memory listener in
``service/shm.py``) only decode a request, call one method here and encode the result or the
error (each error carries its status: ``service/errors.py``). So a rule — which worker mode
routes a gradient where, when a request id is a replay, when an iteration autosaves, what an
unknown name's lr_scale is, what counts in ``/metrics`` — holds the same on every transport.

Every method takes the run's name first; an unknown (or deleted) run is a ``NotFound``.
Methods that may wait (kernels, sync rounds, disk) are called off the event loop by the
HTTP adapter; :meth:`Engine.step` can also be tried with ``blocking=False`` on the loop, and
raises ``WouldBlock`` before doing anything when it would have to wait.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import math
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from stepd.kernels import get_backend

import stepd
from stepd.wire import (
    F32,
    MAX_PAYLOAD,
    PROTOCOL,
    REQUEST_ID_RE,
    REQUEST_ID_RULE,
    RUN_NAME_RE,
    RUN_NAME_RULE,
    WORKER_RE,
    WORKER_RULE,
    narrow,
)

from .checkpoints import AUTO_PREFIX, Activity, CheckpointDir, CheckpointInfo, InvalidCheckpoint
from .config import Settings
from .entries import Entry, StepOutcome
from .errors import Conflict, Invalid, NotFound, OverBudget, Stale, StoreError, Unauthorized
from .groups import check_group, committed_bytes, resolve_group
from .history import history_bytes, ratio
from .metrics import OTHER, Metrics
from .runs import Run
from .rwlock import WouldBlock
from .store import ParamStore
from .workers import Membership, Waiting

log = logging.getLogger("stepd")


def _host_narrow(backend: Any) -> Callable[[np.ndarray, np.dtype], np.ndarray]:
    """Rounding read-backs (host arrays) to a model's precision: the CPU kernels' threaded
    pass on a CPU store, else NumPy's (a CUDA server may have no compiler to build them)."""
    narrowing = getattr(backend, "narrow", None)
    return narrowing if narrowing is not None else partial(narrow, np)


def _in_precision(
    outcomes: list[StepOutcome],
    grads: Mapping[str, np.ndarray],
    dtype: np.dtype | None,
    narrowing: Callable[[np.ndarray, np.dtype], np.ndarray],
) -> list[StepOutcome]:
    """Each read-back parameter in ``dtype``, else in its gradient's precision."""
    if dtype is None:
        for g in grads.values():  # a loop, not all(): no generator on every step's path
            if g.dtype != F32:
                break
        else:
            return outcomes  # the common case: float32 throughout
    return [
        o if o.param is None else replace(o, param=narrowing(o.param, dtype or grads[o.name].dtype))
        for o in outcomes
    ]


ANONYMOUS_PREFIX = "anon-"
# A step tried with blocking=False (on the event loop) runs only when it is known to be cheap:
# at most this many elements, of algorithms whose cost is linear in them, and its locks free.
INLINE_MAX_ELEMENTS = 1 << 16


@dataclass(frozen=True)
class IterationEnd:
    """What ending an iteration did: the new step, and the autosave if one was due."""

    step: int
    autosaved: str | None = None  # the checkpoint written
    autosave_error: str | None = None  # why it was not (the iteration ended all the same)
    dropped: tuple[str, ...] = ()  # sync workers dropped from the iteration (lease expired)


class Engine:
    """The runs of one server process and every operation on them."""

    def __init__(self, settings: Settings, device: str) -> None:
        self.settings = settings
        self.device = device
        self.shard = (settings.shard_index, settings.shard_count)
        self.root = Path(settings.checkpoint_dir)
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()
        backend = get_backend(device)
        self.backend_name = backend.name
        self._narrow = _host_narrow(backend)
        self.budget = settings.memory_budget or default_budget(device)
        self._committed = 0  # over all runs; changed under _lock
        self.metrics = Metrics(
            self.device_bytes,
            lambda: len(self._runs),
            max_runs=settings.metrics_runs,
            per_param=settings.metrics_params,
            live=lambda: list(self._runs.values()),
        )
        self._step_seconds: dict[str, Any] = {}

    # -- the server ------------------------------------------------------------------------

    def limits(self) -> dict[str, int]:
        """What a client must stay within; announced when it joins a run."""
        body = self.settings.max_body_bytes
        return {"max_body_bytes": body, "max_state_bytes": body, "max_control_bytes": MAX_PAYLOAD}

    def status(self) -> dict[str, Any]:
        return {
            "version": stepd.__version__,
            "protocol": PROTOCOL,
            "device": self.backend_name,
            "shard": {"index": self.shard[0], "count": self.shard[1]},
            "runs": len(self._runs),
            "device_bytes": self.device_bytes(),
            "limits": self.limits(),
            "memory": {"budget_bytes": self.budget, "committed_bytes": self._committed},
        }

    def authorize(self, token: object) -> None:
        """A client that is not behind the HTTP front door (shm://) shows the token here."""
        want = self.settings.token
        if want is None:
            return
        given = token.encode() if isinstance(token, str) else b""
        if not hmac.compare_digest(given, want.encode()):
            raise Unauthorized("missing or wrong token")

    def device_bytes(self) -> int:
        return sum(r.store.device_bytes() for r in list(self._runs.values()))

    def clean_temporaries(self) -> list[str]:
        """Delete what interrupted checkpoint saves left behind, in every run's folder."""
        if not self.root.is_dir():
            return []
        return [
            name
            for folder in self.root.iterdir()
            if folder.is_dir()
            for name in CheckpointDir(folder).clean_temporaries()
        ]

    # -- runs ------------------------------------------------------------------------------

    def open_run(
        self,
        name: str | None = None,
        *,
        fresh: bool = False,
        group: Mapping[str, Any] | None = None,
        quota: int | None = None,
        worker: str | None = None,
    ) -> tuple[Run, bool]:
        """Join the named run, creating it if needed (``fresh``: delete it first), or create
        an anonymous one (``name`` None). Returns the run and whether it was created.

        ``group``: the joining client's optimizer configuration (``algorithm``,
        ``hyperparams``, ``workers``), checked now so that a wrong one fails at connect,
        before any run is made. ``quota``: the bytes a new run may commit (joining a run
        leaves its quota as it is). ``worker``: the joining distributed worker, seen by the
        run (a connection that names it once: shm://)."""
        if worker is not None and not (isinstance(worker, str) and WORKER_RE.fullmatch(worker)):
            raise Invalid(f"invalid worker id {worker!r}: {WORKER_RULE}")
        if quota is not None and (
            isinstance(quota, bool) or not isinstance(quota, int) or quota < 1
        ):
            raise Invalid(f"a run's quota is a number of bytes >= 1, got {quota!r}")
        if name is not None and (not isinstance(name, str) or not RUN_NAME_RE.fullmatch(name)):
            raise Invalid(f"invalid run name {name!r}: {RUN_NAME_RULE}")
        workers = check_group(group).workers if group is not None else None
        anonymous = name is None
        with self._lock:
            if name is None:
                name = f"{ANONYMOUS_PREFIX}{secrets.token_hex(8)}"
            existing = self._runs.get(name)
            if existing is not None and existing.anonymous:
                raise Conflict(f"run {name!r} is anonymous: it belongs to the client that made it")
            if existing is not None and not fresh:
                if workers is not None:
                    existing.store.declare_workers(workers)
                existing.touch()
                if worker is not None:
                    existing.workers.touch(worker)
                return existing, False
            if existing is not None:
                self._forget(existing)
            store = ParamStore(
                self.device,
                self.settings.nonfinite,
                self.settings.stats_every,
                self.shard,
                history=self.settings.history,
            )
            run = Run(name, store, CheckpointDir(self.root / name), self.metrics, anonymous, quota)
            run.on_advance = partial(self._advanced_elsewhere, name)
            if workers is not None:
                store.declare_workers(workers)
            self._runs[name] = run
            self.metrics.label(name)  # the first runs keep their names in /metrics
        if existing is not None:  # fresh: the old run's memory goes now, as on a delete
            with existing.store.lock.exclusive():
                existing.store.clear()
        if worker is not None:
            run.workers.touch(worker)
        log.info("run %s %s", name, "created (anonymous)" if anonymous else "created")
        return run, True

    def run(self, name: str) -> Run:
        run = self._runs.get(name)
        if run is None:
            raise NotFound(f"run {name!r} does not exist")
        run.touch()
        return run

    def runs(self) -> list[dict[str, Any]]:
        return [r.info() for r in list(self._runs.values())]

    def delete_run(self, name: str) -> None:
        """Forget the run and free its memory now; an anonymous run's checkpoints go too,
        a named run's stay on disk."""
        with self._lock:
            run = self._runs.get(name)
            if run is None:
                raise NotFound(f"run {name!r} does not exist")
            self._forget(run)
        with run.store.lock.exclusive():  # steps in flight finish first
            run.store.clear()
        if run.anonymous:
            shutil.rmtree(run.checkpoints.root, ignore_errors=True)
        log.info("run %s deleted", name)

    def _forget(self, run: Run) -> None:
        """Drop ``run`` from the runs (call holding ``_lock``); its bytes are no longer
        committed."""
        del self._runs[run.name]
        run.sync.close()
        self._committed -= run.committed
        self.metrics.forget_run(run.name)

    def reap(self, now: float | None = None) -> list[str]:
        """Delete anonymous runs idle for longer than the TTL and held by no connection."""
        now = time.monotonic() if now is None else now
        ttl = self.settings.anonymous_run_ttl
        idle = [
            r.name
            for r in list(self._runs.values())
            if r.anonymous and not r.holders and now - r.last_used > ttl
        ]
        for name in idle:
            with contextlib.suppress(NotFound):  # deleted meanwhile by its client
                self.delete_run(name)
        return idle

    # -- parameters ------------------------------------------------------------------------

    def register(
        self,
        run: str,
        name: str,
        shape: Sequence[int],
        value: np.ndarray | None,
        algorithm: str,
        hyperparams: Mapping[str, Any],
        lr_scale: float = 1.0,
        workers: Mapping[str, Any] | None = None,
        shard_view: tuple[int, int] | None = None,
    ) -> tuple[Entry, bool]:
        """Create ``name`` in ``run`` (True) or confirm an identical registration (False).

        The bytes it commits — the parameter and every state slot its algorithm allocates,
        factors included — are counted against the server's budget and the run's quota
        before anything is allocated (``OverBudget``, naming the numbers)."""
        limit = self.settings.max_body_bytes
        if all(isinstance(d, int) for d in shape) and math.prod(shape) * 4 > limit:
            raise Invalid(
                f"{name!r}: shape {list(shape)} needs more than the body limit of {limit} "
                "bytes per gradient"
            )
        r = self.run(run)
        dims = tuple(shape)
        if not all(isinstance(d, int) and d >= 0 for d in dims):
            raise Invalid(f"{name!r}: invalid shape {list(dims)}")
        _, reference = resolve_group(algorithm, hyperparams, workers)
        need = committed_bytes(reference, dims) + history_bytes(self.settings.history)
        with self._lock:  # registrations are rare: one at a time keeps the books exact
            if name not in r.store:
                self._check_budget(r, name, dims, algorithm, need)
            entry, created = r.store.register(
                name, shape, value, algorithm, hyperparams, lr_scale, workers, shard_view
            )
            if created:
                r.committed += need
                self._committed += need
        return entry, created

    def _check_budget(self, r: Run, name: str, shape: tuple, algorithm: str, need: int) -> None:
        what = f"{name!r} ({algorithm}, shape {list(shape)}) commits {need:,} bytes"
        if self._committed + need > self.budget:
            raise OverBudget(
                f"{what}: the server has {self._committed:,} of its {self.budget:,}-byte budget "
                "committed (STEPD_MEMORY_BUDGET)"
            )
        if r.quota is not None and r.committed + need > r.quota:
            raise OverBudget(
                f"{what}: run {r.name!r} has {r.committed:,} of its {r.quota:,}-byte quota "
                "committed"
            )

    def entry(self, run: str, name: str) -> Entry:
        return self.run(run).store.entry(name)

    def read(self, run: str, name: str) -> np.ndarray:
        return self.run(run).store.read(name)

    def pull(self, run: str, names: Sequence[str]) -> list[tuple[int, np.ndarray]]:
        """Each name's version and float32 value, read together (a worker catching up
        without stepping: the pair it computes its next gradient from)."""
        if not names:
            raise Invalid("a pull needs at least one parameter name")
        if len(set(names)) != len(names):
            raise Invalid("a pull names each parameter once")
        out = []
        for version, value in self.run(run).store.current(names):
            assert value is not None  # current() reads values unless told not to
            out.append((version, value))
        return out

    def set_value(self, run: str, name: str, value: np.ndarray) -> int:
        return self.run(run).store.set_value(name, value)

    def params(self, run: str) -> list[dict[str, Any]]:
        """Every parameter of the run: name, shape, group, algorithm, version, lr_scale and
        the bytes its optimizer state holds."""
        store = self.run(run).store
        return [self._param_info(store, e) for e in store.iter_entries()]

    def param(self, run: str, name: str) -> dict[str, Any]:
        store = self.run(run).store
        return self._param_info(store, store.entry(name))

    @staticmethod
    def _param_info(store: ParamStore, e: Entry) -> dict[str, Any]:
        return {
            "name": e.name,
            "shape": list(e.shape),
            "group": e.group.id,
            "algorithm": e.group.algorithm,
            "version": e.version,
            "lr_scale": store.lr_scale(e.name),
            "state_bytes": store.state_bytes(e.name),
        }

    def inspect(
        self, run: str, name: str
    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
        """Host copies of the parameter and its slots, and its counters, taken atomically."""
        return self.run(run).store.inspect(name)

    def read_slot(self, run: str, name: str, slot: str) -> np.ndarray:
        return self.run(run).store.read_slot(name, slot)

    def global_step(self, run: str) -> int:
        return self.run(run).store.global_step

    # -- statistics and their history ------------------------------------------------------

    def run_stats(self, run: str) -> dict[str, Any]:
        """The run now: its step and step rate, its overall norms, and every parameter with
        its last measured norms (taken every ``stats_every`` steps of it, no tensor read
        here: cheap enough to poll)."""
        r = self.run(run)
        store = r.store
        grad, update, param = r.norms()
        return {
            "name": r.name,
            "global_step": store.global_step,
            "steps_per_s": r.rate.per_second(),
            "lr": store.first_lr(),
            "grad_norm": grad,
            "update_norm": update,
            "param_norm": param,
            "update_ratio": ratio(update, param),
            "stats_every": self.settings.stats_every,
            "params": [
                {
                    **self._param_info(store, e),
                    "lr": store.effective_lr(e.name),
                    "param_norm": e.last_param_norm,
                    "last_grad_norm": e.last_grad_norm,
                    "last_update_norm": e.last_update_norm,
                    "update_ratio": ratio(e.last_update_norm, e.last_param_norm),
                    "norms_at_version": e.norms_at_version,
                }
                for e in store.iter_entries()
            ],
        }

    def param_history(self, run: str, name: str, after: int | None = None) -> dict[str, Any]:
        """The parameter's kept measurements, oldest first; ``after``: only those taken at
        a later version (a poller asks for what it does not have)."""
        _check_after(after)
        e = self.entry(run, name)
        samples = [] if e.history is None else e.history.samples(after)
        for sample in samples:
            sample["update_ratio"] = ratio(sample["update_norm"], sample["param_norm"])
        return {"name": name, "capacity": self.settings.history, "samples": samples}

    def run_history(self, run: str, after: int | None = None) -> dict[str, Any]:
        """The run's samples (step, time, lr, step rate, overall norms), oldest first;
        ``after``: only those of later steps."""
        _check_after(after)
        samples = self.run(run).history.samples(after)
        for sample in samples:
            sample["update_ratio"] = ratio(sample["update_norm"], sample["param_norm"])
        return {"name": run, "capacity": self.settings.history, "samples": samples}

    def adopt(self, run: str, name: str, storage: np.ndarray, created: bool) -> bool:
        """A same-host client lends ``storage`` (its shared-memory segment: the parameter's
        float32 bytes) for ``name``: if the run had the name already, its value is written
        there first (the server's copy wins); then, unless workers average into the name
        (sync), the segment becomes the parameter's storage, updated in place by the kernel.
        Returns whether it did."""
        store = self.run(run).store
        if not created:
            np.copyto(storage, store.read(name).reshape(-1))
        if store.entry(name).group.workers["mode"] == "sync":
            return False
        return store.adopt(name, storage)

    def release(self, run: str, name: str, storage: np.ndarray) -> None:
        """``storage`` goes away: the parameter moves back into the run's own memory (a
        deleted run keeps nothing)."""
        with contextlib.suppress(NotFound):
            self.run(run).store.release(name, storage)

    def lr_scale(self, run: str, name: str) -> float:
        return self.run(run).store.lr_scale(name)

    def set_lr_scale(self, run: str, name: str, scale: float) -> float:
        store = self.run(run).store
        store.set_lr_scale(name, scale)
        return store.lr_scale(name)

    def update_hessian(self, run: str, name: str, hessian: np.ndarray) -> None:
        self.run(run).store.update_hessian(name, hessian)

    # -- steps -----------------------------------------------------------------------------

    def step(
        self,
        run: str,
        grads: Mapping[str, np.ndarray],
        *,
        worker: str | None = None,
        iteration: int | None = None,
        versions: Mapping[str, int] | None = None,
        read_back: bool = False,
        request_id: str | None = None,
        blocking: bool = True,
        transport: str = "http",
        return_dtype: np.dtype | None = None,
        last: bool = False,
    ) -> list[StepOutcome]:
        """Apply one gradient per name, each routed by its group's workers mode; returns
        once done (sync names: once their rounds are complete). The arguments are those of
        :meth:`start_step`."""
        return self.start_step(
            run,
            grads,
            worker=worker,
            iteration=iteration,
            versions=versions,
            read_back=read_back,
            request_id=request_id,
            blocking=blocking,
            transport=transport,
            return_dtype=return_dtype,
            last=last,
        ).wait()

    def start_step(
        self,
        run: str,
        grads: Mapping[str, np.ndarray],
        *,
        worker: str | None = None,
        iteration: int | None = None,
        versions: Mapping[str, int] | None = None,
        read_back: bool = False,
        request_id: str | None = None,
        blocking: bool = True,
        transport: str = "http",
        return_dtype: np.dtype | None = None,
        last: bool = False,
    ) -> Waiting[list[StepOutcome]]:
        """Apply one gradient per name, each routed by its group's workers mode.

        Gradients are float32, or in the model's precision (bfloat16 as uint16 bits,
        float16); the parameters read back (``read_back``) come in ``return_dtype``, by
        default each in its gradient's precision, rounded to nearest even from the float32
        master weights.

        Plain and async groups step at once (one fused launch per group; async gradients are
        checked against ``max_staleness`` from ``versions``, the parameter versions they were
        computed from: if one is beyond it, nothing of the plain and async part is applied
        and their outcomes are ``stale``, with the current versions and values); sync groups
        join the round of ``iteration`` (default: the current one); the result waits for
        every worker's gradient (``wait()`` on a thread, ``await wait_async()`` on an event
        loop: no thread is held while others are awaited). ``request_id``: a repeat of an
        applied request is answered with its recorded outcome and applies nothing. Outcomes come in
        the order of ``grads``. ``blocking=False``: ``WouldBlock`` (before anything is done)
        unless the step is cheap and its locks are free — the HTTP adapter then runs it on a
        worker thread instead of its event loop. ``last`` (sync groups): these are the
        worker's last gradients of the iteration — rounds of parameters it did not use go on
        without waiting for its end_iteration (see service/workers.py).
        """
        start = time.perf_counter()
        r = self._runs.get(run)  # self.run(run), inlined: this is every step's path
        if r is None:
            raise NotFound(f"run {run!r} does not exist")
        r.last_used = time.monotonic()
        store = r.store
        if worker is not None and not (isinstance(worker, str) and WORKER_RE.fullmatch(worker)):
            raise Invalid(f"invalid worker id {worker!r}: {WORKER_RULE}")
        if request_id is not None and not REQUEST_ID_RE.fullmatch(request_id):
            raise Invalid(f"invalid X-Stepd-Request-Id {request_id[:160]!r}: {REQUEST_ID_RULE}")
        if not grads:
            raise Invalid("a step needs at least one gradient")
        # One pass over the names; on the common path (plain groups) nothing else is built.
        entries: dict[str, Entry] = {}
        sync: list[str] = []
        for n, g in grads.items():
            e = entries[n] = store.entry(n)
            if g.ndim > 1 and g.shape != e.shape:  # flat, or the parameter's own shape
                raise Invalid(
                    f"{n!r}: gradient of shape {list(g.shape)} for a parameter of shape "
                    f"{list(e.shape)}"
                )
            mode = e.group.workers["mode"]
            if mode == "sync":
                if worker is None:
                    raise Invalid(f"{n!r} is in a sync group: name this worker (a worker id)")
                sync.append(n)
            elif mode == "async" and (versions is None or n not in versions):
                raise Invalid(
                    f"{n!r} is in an async group: pass the parameter version its gradient "
                    "was computed from"
                )
        if versions and any(v < 0 for v in versions.values()):
            raise Invalid(f"parameter versions are >= 0, got {dict(versions)}")
        if not blocking and (
            sync  # a round waits for the other workers
            or sum(g.size for g in grads.values()) > INLINE_MAX_ELEMENTS
            or not all(e.group.linear_cost for e in entries.values())
        ):
            raise WouldBlock
        if not sync and not versions:  # plain groups only: straight to the store
            ordered = store.step(grads, read_back, blocking, None, request_id)
        elif not sync:  # and async ones: staleness checked and counted
            ordered = self._apply(r, grads, read_back, blocking, versions, request_id)
        else:
            assert worker is not None  # a sync step without a worker id was refused above
            rest = {n: g for n, g in grads.items() if n not in sync}
            applied = self._apply(r, rest, read_back, blocking, versions, request_id)
            # Join every round first (each completes as soon as it has all it will get),
            # then wait for them all.
            rounds = r.sync.contribute(
                {n: grads[n] for n in sync},
                worker,
                iteration,
                {n: entries[n].group.workers["timeout_s"] for n in sync},
                request_id,
                last,
            )

            def finish(done: list[StepOutcome]) -> list[StepOutcome]:
                outcomes = {o.name: o for o in (*applied, *done)}
                ordered = [outcomes[n] for n in grads]
                self._count_step(r, entries, ordered, worker, start, transport)
                return _in_precision(ordered, grads, return_dtype, self._narrow)

            return Waiting.gather(r.sync, rounds, finish)
        self._count_step(r, entries, ordered, worker, start, transport)
        return Waiting.done(_in_precision(ordered, grads, return_dtype, self._narrow))

    def _count_step(
        self,
        r: Run,
        entries: Mapping[str, Entry],
        ordered: list[StepOutcome],
        worker: str | None,
        start: float,
        transport: str,
    ) -> None:
        """A step's metrics and its worker's record."""
        if worker is not None:
            r.workers.record(worker, ordered)
        for o in ordered:
            if o.replayed or o.stale:  # counted when applied; stale ones in _apply
                continue
            if o.applied:
                r.counter(entries[o.name].group.id).inc()
            else:
                self.metrics.skipped.labels(self.metrics.label(r.name)).inc()
        seconds = self._step_seconds.get(transport) or self._seconds(transport)
        seconds.observe(time.perf_counter() - start)

    def _apply(
        self,
        r: Run,
        grads: Mapping[str, np.ndarray],
        read_back: bool,
        blocking: bool,
        versions: Mapping[str, int] | None,
        request_id: str | None,
    ) -> list[StepOutcome]:
        """The store's step of plain and async names, staleness counted in the metrics."""
        if not grads:
            return []
        based_on = None
        if versions:
            based_on = {n: v for n, v in versions.items() if n in grads} or None
        try:
            applied = r.store.step(grads, read_back, blocking, based_on, request_id)
        except Stale:
            # Not an error: under async a worker that lagged did nothing wrong. Nothing of
            # the request is applied (as before: a refusal the sender sees), and the reply
            # carries every name's current version and value, so the worker continues from
            # them instead of sending gradients from its old copy that are refused forever.
            # Not recorded under the request id: a resend is still stale (versions only
            # grow) and is answered the same way.
            now = r.store.current(list(grads), read_back, blocking)
            self.metrics.stale_rejected.labels(self.metrics.label(r.name)).inc()
            return [
                StepOutcome(n, version, False, value, stale=True)
                for n, (version, value) in zip(grads, now, strict=True)
            ]
        if based_on is not None:
            for o in applied:
                if o.staleness is not None:
                    self.metrics.staleness.labels(self.metrics.label(r.name)).observe(o.staleness)
        return applied

    def _seconds(self, transport: str) -> Any:
        """The step-duration histogram of ``transport`` (its child kept: labels() is slow)."""
        child = self._step_seconds.get(transport)
        if child is None:
            child = self._step_seconds[transport] = self.metrics.step_seconds.labels(transport)
        return child

    def end_iteration(self, run: str, worker: str | None = None) -> IterationEnd:
        """Advance the run's global step; returns the new step once it has advanced (see
        :meth:`start_end_iteration`)."""
        return self.start_end_iteration(run, worker).wait()

    def start_end_iteration(self, run: str, worker: str | None = None) -> Waiting[IterationEnd]:
        """Advance the run's global step; gives the new step.

        With sync groups, each worker passes its id and the call is a barrier: the result
        waits until all of them have called it (the last one advances the step in its call;
        the others wait without holding a thread with ``wait_async``). Every
        ``autosave_every`` iterations this also writes ``auto-<step>`` and keeps the newest
        ``autosave_keep`` automatic checkpoints. The iteration ends whatever the autosave
        does: a failed one (a full disk) is reported in the reply, logged and counted in
        ``/metrics`` — never an error that a retrying client would answer by ending the
        iteration twice.
        """
        r = self.run(run)
        store = r.store
        if worker is not None and not (isinstance(worker, str) and WORKER_RE.fullmatch(worker)):
            raise Invalid(f"invalid worker id {worker!r}: {WORKER_RULE}")
        dropped: tuple[str, ...] = ()
        if worker is not None and store.sync_options() is not None:
            r.workers.touch(worker)
            advanced = r.sync.end_iteration(worker, store.sync_timeout())
            if isinstance(advanced, Waiting):  # another call advances it (and autosaves)
                return advanced.then(lambda a: IterationEnd(a.step, dropped=a.dropped))
            step, dropped = advanced.step, advanced.dropped
        else:
            step = store.end_iteration()
        return Waiting.done(replace(self._iteration_ended(run, step), dropped=dropped))

    def _iteration_ended(self, run: str, step: int) -> IterationEnd:
        """The run's step advanced to ``step``: the metrics, its history, and the autosave if
        one is due."""
        self._show_step(run, step)
        advanced = self._runs.get(run)
        if advanced is not None:
            advanced.iteration_ended(step, self.settings.stats_every or 1)
        every = self.settings.autosave_every
        if not (every and step % every == 0):
            return IterationEnd(step)
        r = self.run(run)
        try:
            info = self.save_checkpoint(run, auto=True)
            r.checkpoints.prune_auto(self.settings.autosave_keep)
        except (StoreError, OSError) as exc:
            log.error("run %s: autosave at step %d failed: %s", run, step, exc)
            self.metrics.autosave_failures.labels(self.metrics.label(run)).inc()
            return IterationEnd(step, autosave_error=str(exc))
        return IterationEnd(step, autosaved=info.name)

    def _show_step(self, run: str, step: int) -> None:
        label = self.metrics.label(run)
        if label != OTHER:  # one gauge cannot hold the steps of several runs
            self.metrics.iterations.labels(label).set(step)

    def _advanced_elsewhere(self, run: str, step: int) -> None:
        """A sync member dropped or leaving completed the barrier (not an end_iteration
        call, which reports it itself)."""
        with contextlib.suppress(NotFound):  # deleted meanwhile
            self._iteration_ended(run, step)

    # -- sync membership -------------------------------------------------------------------

    def _sync_worker(self, run: str, worker: str) -> Run:
        if not (isinstance(worker, str) and WORKER_RE.fullmatch(worker)):
            raise Invalid(f"invalid worker id {worker!r}: {WORKER_RULE}")
        r = self.run(run)
        r.workers.touch(worker)
        return r

    def join(self, run: str, worker: str) -> Waiting[Membership]:
        """Make ``worker`` a sync member of the run: of the running iteration if it has not
        started, else of the next — the result then waits until that one begins (``wait()``
        or ``await wait_async()``, as a step's)."""
        r = self._sync_worker(run, worker)
        joined = r.sync.join(worker, r.store.sync_timeout())
        return joined if isinstance(joined, Waiting) else Waiting.done(joined)

    def leave(self, run: str, worker: str) -> Membership:
        """``worker`` leaves the run's sync membership now: what it sent this iteration
        counts, nothing waits for it any more (rounds and the barrier may complete here)."""
        return self._sync_worker(run, worker).sync.leave(worker)

    def heartbeat(self, run: str, worker: str) -> Membership:
        """``worker`` is alive (between requests: a long evaluation); its lease starts
        again. Cheap: it may run on the event loop."""
        return self._sync_worker(run, worker).sync.heartbeat(worker)

    def membership(self, run: str) -> Membership:
        return self.run(run).sync.membership()

    def workers(self, run: str) -> list[dict[str, Any]]:
        return self.run(run).workers.list()

    # -- groups, lr, optimizer state -------------------------------------------------------

    def set_lr(self, run: str, lr: float, group: str | None = None) -> list[str]:
        return self.run(run).store.set_lr(lr, group)

    def set_hyperparams(self, run: str, group: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change a group's hyperparameters other than the lr (a scheduler cycling momentum
        or betas); its state stays, and a change of the state's layout is refused. Returns
        the group's hyperparameters now; its id (its creation config) does not change."""
        if not isinstance(changes, Mapping) or not changes:
            raise Invalid(f"hyperparameter changes must be a non-empty object, got {changes!r}")
        return self.run(run).store.set_hyperparams(group, changes)

    def groups(self, run: str) -> list[dict[str, Any]]:
        return self.run(run).store.groups()

    def group(self, run: str, group_id: str) -> dict[str, Any]:
        for g in self.groups(run):
            if g["id"] == group_id:
                return g
        raise NotFound(f"group {group_id!r} does not exist")

    def group_state(self, run: str, group_id: str) -> tuple[dict[str, Any], dict[str, int]]:
        """The group's optimizer ``state_dict`` (host copies) and its parameters' versions."""
        return self.run(run).store.group_state(group_id)

    def load_group_state(
        self, run: str, group_id: str, tensors: Mapping[str, Any], meta: Mapping[str, str]
    ) -> None:
        self.run(run).store.load_group_state(group_id, tensors, meta)

    # -- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(
        self, run: str, name: str | None = None, *, auto: bool = False
    ) -> CheckpointInfo:
        """Write the run's checkpoint ``name`` (default: ``step-<step>-<time>``); ``auto``:
        ``auto-<step>``, the step read in the same lock hold as the state, so the name
        always says what the file holds (another end_iteration may come in between)."""
        r = self.run(run)
        if name is not None:
            r.checkpoints.path(name)  # validate before the (possibly long) snapshot

        def write(tensors: dict[str, Any], meta: dict[str, Any]) -> CheckpointInfo:
            chosen = f"{AUTO_PREFIX}{meta['global_step']:08d}" if auto else name
            return r.checkpoints.save(tensors, meta, chosen)

        start = time.perf_counter()
        info = r.store.write_snapshot(write, device=True)  # a CUDA store's: streamed
        seconds = time.perf_counter() - start
        self.metrics.checkpoint_seconds.labels(self.metrics.label(run), "save").observe(seconds)
        return info

    def restore_checkpoint(self, run: str, name: str) -> CheckpointInfo:
        """Bring back exactly the saved state (params, slots, step, lr, lr_scales)."""
        r = self.run(run)
        start = time.perf_counter()
        # The whole file is read and parsed before anything changes, and the reply is what
        # was read: a delete racing this restore gives a 404 with nothing changed, or a
        # full restore (never a restore answered with an error).
        # A CUDA store's tensors come as new device arrays, uploaded on its stream as read
        with r.store.device_stream:
            tensors, meta, info = r.checkpoints.load_info(name, xp=r.store.xp)
        r.store.restore(tensors, meta, fresh=True)
        r.reset_rounds()
        with self._lock:  # the books follow what was brought back
            now = r.store.committed_bytes()
            self._committed += now - r.committed
            r.committed = now
        seconds = time.perf_counter() - start
        self.metrics.checkpoint_seconds.labels(self.metrics.label(run), "restore").observe(seconds)
        self._show_step(run, r.store.global_step)
        return info

    def checkpoints(self, run: str) -> list[CheckpointInfo]:
        """The run's valid checkpoints, oldest first (headers read, never the data)."""
        return self.run(run).checkpoints.list()

    def invalid_checkpoints(self, run: str) -> list[InvalidCheckpoint]:
        """What the run's folder holds under ``*.safetensors`` that :meth:`checkpoints`
        leaves out — symlinks, FIFOs, folders, empty or torn files, foreign or bad headers,
        names no route can address — each with the reason."""
        return self.run(run).checkpoints.scan()[1]

    def checkpoint_activity(self, run: str) -> Activity | None:
        """The run's checkpoint save or restore under way, if any: its progress in bytes."""
        return self.run(run).checkpoints.activity

    def delete_checkpoint(self, run: str, name: str) -> None:
        self.run(run).checkpoints.delete(name)

    def save_all(self) -> list[CheckpointInfo]:
        """A final checkpoint of every named run that holds parameters (shutdown)."""
        return [
            self.save_checkpoint(r.name)
            for r in list(self._runs.values())
            if not r.anonymous and r.store.names()
        ]


def _check_after(after: int | None) -> None:
    if after is not None and after < 0:
        raise Invalid(f"after is a version or step >= 0, got {after}")


def default_budget(device: str) -> int:
    """Half the host's memory for a CPU store, 80% of the GPU's for a CUDA one."""
    if device == "cuda":
        import cupy

        return int(cupy.cuda.Device().mem_info[1] * 0.8)
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5)
