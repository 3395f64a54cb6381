"""A client's session with one stepd server: the client-side policy, written once.

Whatever carries the bytes (:mod:`stepd.client.http`, :mod:`stepd.client.shm`), the rules are
these:

- **The run.** Opening the session joins the named run (``connect(url, run="exp-42")``,
  ``fresh=True`` deletes it first) or creates an anonymous run private to this optimizer
  (``connect(url)``), deleted again when it closes. The server checks the optimizer's group
  (algorithm, hyperparameters, workers mode) right then, announces its limits and, for a
  sharded deployment, which shard it is.
- **Registration.** A name's first ``step`` (or ``register``) registers it with the local
  ``param`` as its initial value, the group, and an lr_scale set before. If the run already
  holds the name with the same shape, group and lr_scale, **the server's copy wins**: it
  overwrites the local ``param``, so a worker that joins or restarts continues from the run's
  weights. Another config is a ``ConflictError``.
- **lr and lr_scale** set before the group or the name exist on the server are kept here and
  sent when they do; an unregistered name's lr_scale is its pending one, else 1.0.
- **Async workers** send each gradient with the parameter version it was computed from. A
  gradient the server refuses as stale (beyond ``max_staleness``) is not an error: the reply
  carries the current values and versions, written into the params, so the worker's next
  gradient is computed from fresh weights; the refusals are counted (``stale_gradients``).
  ``Pull`` brings the current values and versions without stepping.
- **Retries** (transports that allow them: http://). Every step carries a request id (128
  random bits of this session and a counter); after a transport failure the same request is
  resent, up to ``retries`` times, and the server applies it once. ``end_iteration`` and
  Hessian estimates are never resent (a repeat would count twice); other idempotent requests
  once.
- **Heartbeats.** A sync worker of a run with a lease (``lease_s``) heartbeats from a
  daemon thread while it sends nothing else for a quarter of the lease (a long evaluation, a
  checkpoint of its own), so only a worker that died or lost the network is dropped — a hung
  training loop is not. Nothing is sent while another request is under way (waiting in a
  round renews the lease on the server), after ``leave`` or a refused heartbeat (dropped: it
  must join again), or after ``close``.
- **load_state_dict** uploads the state of registered names at once; names not registered
  yet stay pending and are uploaded right after they register (:mod:`stepd.client.state`).
  A state larger than the server announced it takes is a ``ValueError`` before sending.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, TypeVar

from .errors import StepdError, TransportError
from .state import StateLoad
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

T = TypeVar("T")
log = logging.getLogger("stepd.client")
# A heartbeat goes out once the session has been idle this fraction of the lease: the lease
# then survives one lost heartbeat and a slow reply.
HEARTBEAT_FRACTION = 0.25


class Session(Transport):
    """The Optimizer contract's ops, over one server transport and one run."""

    def __init__(
        self,
        transport: ServerTransport,
        algorithm: str,
        hyperparams: Mapping[str, Any],
        *,
        run: str | None = None,
        fresh: bool = False,
        worker: str | None = None,
        workers: Mapping[str, Any] | None = None,
        shard: tuple[int, int] | None = None,
        retries: int = 2,
        heartbeat: bool = True,
    ) -> None:
        self.transport = transport
        self.algorithm = algorithm
        self.hyperparams = dict(hyperparams)
        self.group_spec: dict[str, Any] = {"algorithm": algorithm, "hyperparams": self.hyperparams}
        if workers is not None:
            self.group_spec["workers"] = dict(workers)
        self._async = workers is not None and workers.get("mode") == "async"
        self.shard = shard
        self._retries = retries if transport.can_retry else 0
        self._reads = 1 if transport.can_retry else 0
        self._request_prefix = secrets.token_hex(16)  # 128 random bits: unique across clients
        self._request_counter = itertools.count(1)
        self.registered: dict[str, tuple[int, ...]] = {}
        self.versions: dict[str, int] = {}  # the version each param came from (async groups)
        self.stale_gradients = 0  # refused as stale: their params were refreshed instead
        self.group_id: str | None = None
        self.lr: float | None = None  # set_lr (or a loaded lr) not on the server yet
        self.pending_scales: dict[str, float] = {}  # set_lr_scale before registration
        self.explicit_scales: set[str] = set()
        self.pending_load: StateLoad | None = None  # load_state_dict not fully uploaded yet
        self.worker = worker
        # One request at a time on the transport (the heartbeat thread shares it), and when
        # the last one ended: the heartbeat's clock.
        self._lock = threading.Lock()
        self._last = time.monotonic()
        lease = (workers or {}).get("lease_s")
        sync_worker = worker is not None and workers is not None and workers.get("mode") == "sync"
        self._heartbeat_s: float | None = None
        if heartbeat and sync_worker and isinstance(lease, (int, float)):
            self._heartbeat_s = float(lease) * HEARTBEAT_FRACTION
        self._member = False  # as far as this client knows: heartbeats keep it one
        self._closed = threading.Event()
        self._heart: threading.Thread | None = None
        info = transport.open_run(run, fresh, worker, self.group_spec)
        self.run: str = info["run"]
        self.anonymous: bool = bool(info.get("anonymous", run is None))
        self.limits: dict[str, int] = dict(info.get("limits", {}))
        if shard is not None and info.get("shard") != {"index": shard[0], "count": shard[1]}:
            transport.close(delete_run=self.anonymous)
            raise ValueError(
                f"{transport.url} is shard {info.get('shard')}, but the client's server list "
                f"makes it shard {shard[0]} of {shard[1]}"
            )

    # -- plumbing ---------------------------------------------------------------------------

    def _retry(self, call: Callable[[], T], times: int) -> T:
        """``call()``, sent again after a transport failure up to ``times`` times."""
        for attempt in range(times + 1):
            try:
                return call()
            except TransportError:
                if attempt == times:
                    raise
                time.sleep(min(0.05 * 2**attempt, 1.0))
        raise AssertionError("unreachable")

    def _request_id(self) -> str:
        return f"{self._request_prefix}-{next(self._request_counter)}"

    def close(self) -> None:
        self._closed.set()
        with self._lock:  # a heartbeat in flight finishes first
            self.transport.close(delete_run=self.anonymous)

    # -- heartbeats -------------------------------------------------------------------------

    def _membership_seen(self, op: Op) -> None:
        """After a successful op: whether this worker is a sync member now, as far as the
        client can tell, and the heartbeat thread started on the first sign of it."""
        if type(op) is SyncMembership:
            self._member = op.action != "leave"
        elif type(op) in (Step, EndIteration):
            self._member = True
        else:
            return
        if self._member and self._heart is None and not self._closed.is_set():
            self._heart = threading.Thread(target=self._beat, name="stepd-heartbeat", daemon=True)
            self._heart.start()

    def _beat(self) -> None:
        every = self._heartbeat_s
        assert every is not None
        while not self._closed.wait(every / 2):
            if not self._member or time.monotonic() - self._last < every:
                continue
            if not self._lock.acquire(blocking=False):
                continue  # a request is under way: it renews the lease itself
            try:
                if self._closed.is_set():
                    return
                self.transport.membership("heartbeat")
                self._last = time.monotonic()
            except TransportError as exc:  # the next request will tell the caller
                log.debug("heartbeat of worker %s: %s", self.worker, exc)
            except StepdError as exc:  # dropped meanwhile: it must join again
                log.warning("heartbeat of worker %s refused: %s", self.worker, exc)
                self._member = False
            finally:
                self._lock.release()

    # -- ops --------------------------------------------------------------------------------

    def handle(self, op: Op) -> Any:
        if self._heartbeat_s is None:  # no lease: no thread, nothing to share the transport
            return self._handle(op)
        with self._lock:
            try:
                out = self._handle(op)
            finally:
                self._last = time.monotonic()
            self._membership_seen(op)
            return out

    def _handle(self, op: Op) -> Any:
        if type(op) is Step:  # every step comes here: skip the match below
            return self._step(op.items, op.last)
        t = self.transport
        match op:
            case Step(items=items, last=last):
                return self._step(items, last)
            case Register(items=items):
                return self._ensure_registered(items)
            case Pull(items=items):
                self._ensure_registered(items)
                self.versions.update(self._retry(partial(t.pull, items), self._reads))
                return None
            case SyncMembership(action=action):
                # idempotent on the server (joining or leaving twice is harmless): resent once
                return self._retry(partial(t.membership, action), self._reads)
            case EndIteration():
                step = t.end_iteration()
                if self.pending_load is not None and self.pending_load.first:
                    return self.pending_load.advance()  # the loaded step, not uploaded yet
                return step
            case GetLr():
                if self.group_id is not None:
                    gid = self.group_id
                    return float(self._retry(lambda: t.group(gid), self._reads)["lr"])
                return self.lr if self.lr is not None else self.hyperparams.get("lr")
            case SetLr(lr=lr):
                if self.group_id is not None:
                    gid = self.group_id
                    self._retry(lambda: t.set_lr(gid, lr), self._reads)
                self.lr = lr
                return None
            case SetValue(name=name, value=value):
                if name in self.registered:  # else its registration carries the value
                    self._retry(lambda: t.set_value(name, value), self._reads)
                return None
            case SetHyperparams(changes=changes):
                if self.group_id is None:  # the group is made with them when it is
                    self.hyperparams.update(changes)
                    return dict(self.hyperparams)
                gid = self.group_id
                return self._retry(lambda: t.set_hyperparams(gid, changes), self._reads)
            case GetLrScale(name=name):
                if name in self.registered:
                    return self._retry(lambda: t.lr_scale(name), self._reads)
                return self.pending_scales.get(name, 1.0)
            case SetLrScale(name=name, scale=scale):
                if name in self.registered:
                    self._retry(lambda: t.set_lr_scale(name, scale), self._reads)
                else:
                    self.pending_scales[name] = scale
                self.explicit_scales.add(name)
                return None
            case GetStateDict():
                sd = self._server_state_dict()
                if self.pending_load is None:
                    return sd
                return self.pending_load.overlay(sd, self.pending_scales)
            case UpdateHessian(name=name, hessian=hessian):
                if name not in self.registered:
                    raise ValueError(
                        f"{name!r} is not registered in this session: register or step it "
                        "before sending its Hessian estimate"
                    )
                return t.update_hessian(name, hessian)  # never resent: it would count twice
            case LoadStateDict(state=state):
                return self._load_state(state)
        raise TypeError(f"unknown op {op!r}")

    def _ensure_registered(self, items: tuple[Item, ...]) -> None:
        t = self.transport
        for name, shape, param, _ in items:
            if name in self.registered:
                continue
            scale = self.pending_scales.get(name, 1.0)
            reg = self._retry(
                partial(t.register, name, shape, param, self.group_spec, scale, self.shard),
                self._reads,
            )
            if self.group_id is None:
                self.group_id = reg.group
                if self.lr is not None:  # set_lr came before the group existed
                    self._retry(partial(t.set_lr, reg.group, self.lr), self._reads)
            self.registered[name] = shape
            self.versions[name] = reg.version
            self.pending_scales.pop(name, None)
        if self.pending_load is not None:  # loaded state of names registered just now
            self._upload_state(self.pending_load)

    def _step(self, items: tuple[StepItem, ...], last: bool = False) -> None:
        # This runs per step: the common case (names known, nothing pending, no retries to
        # arm) costs a few dict lookups.
        known = self.registered
        if self.pending_load is not None or not all(item[0] in known for item in items):
            self._ensure_registered(items)
        t = self.transport
        versions = {item[0]: self.versions[item[0]] for item in items} if self._async else None
        rid = self._request_id() if t.request_ids else ""  # the same on every resend
        if self._retries:
            new, stale = self._retry(partial(t.step, items, versions, rid, last), self._retries)
        else:
            new, stale = t.step(items, versions, rid, last)
        if self._async:
            self.versions.update(new)
        if stale:  # the params hold the current values now: the next gradient is fresh
            self.stale_gradients += len(stale)

    # -- optimizer state --------------------------------------------------------------------

    def _server_state_dict(self) -> dict[str, Any]:
        """The run's state of this session's group, as ``kernels.Optimizer.state_dict()``
        gives it: every parameter of the group in the run (not only this session's)."""
        t = self.transport
        if self.group_id is None:  # nothing registered yet: what connect() was given
            lr = self.lr if self.lr is not None else self.hyperparams.get("lr")
            return {
                "algorithm": self.algorithm,
                "hyperparams": json.loads(json.dumps(self.hyperparams)),
                "global_step": self._retry(t.global_step, self._reads),
                "lr": lr,
                "lr_scales": dict(self.pending_scales),
                "state": {},
            }
        gid = self.group_id
        sd = self._retry(lambda: t.group_state(gid), self._reads)
        sd["lr_scales"] = {
            n: float(s) for n, s in sd["lr_scales"].items() if s != 1.0 or n in self.explicit_scales
        }
        return sd

    def _load_state(self, state: Mapping[str, Any]) -> None:
        """Upload what can go now; keep the rest pending."""
        load = StateLoad(state, self.algorithm)
        if self.group_id is not None:  # lr_scales of this session's names: as loaded, else 1
            scales = {n: load.lr_scales.get(n, 1.0) for n in self.registered}
            self._upload_state(load, scales)
        self.pending_load = None if load.finished else load
        if load.lr is not None:
            self.lr = load.lr
        self.pending_scales = {n: s for n, s in load.lr_scales.items() if n not in self.registered}
        self.explicit_scales = set(load.lr_scales)

    def _upload_state(self, load: StateLoad, lr_scales: Mapping[str, float] | None = None) -> None:
        """Send the part of ``load`` that is due (idempotent on the server)."""
        if self.group_id is None:
            return
        due = load.next_upload(self.registered, lr_scales)
        if due is None:
            return
        body, names = due
        limit = self.limits.get("max_state_bytes")
        if limit is not None and len(body) > limit:
            raise ValueError(
                f"load_state_dict: {len(body)} bytes of state exceed the {limit} bytes this "
                "server takes in one upload (its STEPD_MAX_BODY_BYTES)"
            )
        gid = self.group_id
        self._retry(lambda: self.transport.load_state(gid, body), self._reads)
        load.uploaded(names)
        if load is self.pending_load and load.finished:
            self.pending_load = None
