"""Runs: isolated optimizer worlds on one server.

A run has its own parameters (names unique within it), groups, global step, lr and lr_scales
(its :class:`ParamStore`), workers and sync rounds, request-id log, checkpoints (a folder of
its own under the checkpoint dir) and a ``run`` label on its metrics. Nothing is shared
between runs but the device and the server's limits.

A *named* run is shared: every client that joins it by name sees the same parameters (the
server's copy wins), which is what distributed workers and resumed jobs want. An *anonymous*
run belongs to one client: it gets a generated name, is deleted when that client closes, and
is reaped by the server once idle longer than ``STEPD_ANONYMOUS_RUN_TTL``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .checkpoints import CheckpointDir
from .history import RUN_FIELDS, History, StepRate
from .metrics import Metrics
from .store import ParamStore
from .workers import SyncRounds, WorkerRegistry, membership_options


@dataclass(eq=False)
class Run:
    name: str
    store: ParamStore
    checkpoints: CheckpointDir
    metrics: Metrics
    anonymous: bool = False
    quota: int | None = None  # bytes its parameters and state may commit (None: the budget's)
    committed: int = 0  # bytes its parameters and state commit (service/groups.py)
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    holders: int = 0  # shm:// connections bound to it: an anonymous run lives while they do
    workers: WorkerRegistry = field(default_factory=WorkerRegistry)
    sync: SyncRounds = field(init=False)
    # called when the iteration advances other than in an end_iteration call (a sync member
    # dropped or leaving completes the barrier): the engine's autosave and metrics
    on_advance: Callable[[int], None] | None = None
    _counters: dict[str, Any] = field(default_factory=dict)
    rate: StepRate = field(default_factory=StepRate)  # iterations per second, recently
    history: History = field(init=False)  # every stats_every iterations: RUN_FIELDS

    def __post_init__(self) -> None:
        self.sync = self._rounds()
        self.history = History(self.store.history, RUN_FIELDS)

    def iteration_ended(self, step: int, every: int) -> None:
        """Count the iteration in the step rate; every ``every`` steps, a history sample."""
        self.rate.tick()
        if step % every:
            return
        grad, update, param = self.norms()
        self.history.append(
            step, time.time(), self.store.first_lr(), self.rate.per_second(), grad, update, param
        )

    def norms(self) -> tuple[float | None, float | None, float | None]:
        """The run's gradient, update and parameter norms: the root of the sum of squares
        of each parameter's last measured ones (None before any measurement)."""
        sums = [0.0, 0.0, 0.0]
        seen = False
        for e in self.store.iter_entries():
            if e.last_grad_norm is None:
                continue
            seen = True
            for i, v in enumerate((e.last_grad_norm, e.last_update_norm, e.last_param_norm)):
                sums[i] += (v or 0.0) ** 2
        if not seen:
            return None, None, None
        return math.sqrt(sums[0]), math.sqrt(sums[1]), math.sqrt(sums[2])

    def _rounds(self) -> SyncRounds:
        return SyncRounds(self.store, self._sync_options, self._advanced)

    def _sync_options(self) -> Mapping[str, Any]:
        return self.store.sync_options() or membership_options({})

    def _advanced(self, step: int) -> None:
        if self.on_advance is not None:
            self.on_advance(step)

    def counter(self, group: str) -> Any:
        """The steps counter of this run's ``group`` (its child kept: labels() is slow)."""
        child = self._counters.get(group)
        if child is None:
            child = self._counters[group] = self.metrics.steps.labels(self.name, group)
        return child

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def reset_rounds(self) -> None:
        """Rounds in flight belonged to state that was just replaced (a restore); the sync
        membership starts again too (workers rejoin as they step)."""
        self.sync.close()
        self.sync = self._rounds()

    def info(self) -> dict[str, Any]:
        store = self.store
        return {
            "name": self.name,
            "anonymous": self.anonymous,
            "created": self.created,
            "idle_s": round(time.monotonic() - self.last_used, 3),
            "global_step": store.global_step,
            "params": len(store.names()),
            "device_bytes": store.device_bytes(),
            "committed_bytes": self.committed,
            "quota_bytes": self.quota,
            "groups": store.groups(),
        }
