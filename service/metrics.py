"""Prometheus metrics of one server (its own registry, so tests can build many apps).

Everything a run does carries a ``run`` label; a deleted run's series go with it. Labels are
bounded: the first ``max_runs`` runs alive get their name (``STEPD_METRICS_RUNS``), the runs
beyond share the label ``_other`` (counters add up there; per-run gauges are summed), so a
server that makes many anonymous runs cannot grow the scrape without end. Per-parameter
series (``stepd_param_*``) exist only with ``STEPD_METRICS_PARAMS=true``, for labelled runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

OTHER = "_other"  # the label of the runs beyond the labelled ones


class Metrics:
    def __init__(
        self,
        device_bytes: Callable[[], int],
        runs: Callable[[], int],
        *,
        max_runs: int = 32,
        per_param: bool = False,
        live: Callable[[], Iterable[Any]] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.max_runs = max_runs
        self._labels: dict[str, str] = {}  # run → its label, fixed for the run's life
        self._labelled = 0
        self._lock = threading.Lock()
        r = self.registry
        self.steps = Counter("stepd_steps", "Parameter steps applied", ["run", "group"], registry=r)
        self.skipped = Counter(
            "stepd_nonfinite_skipped", "Gradients skipped for NaN/Inf entries", ["run"], registry=r
        )
        self.step_seconds = Histogram(
            "stepd_step_seconds",
            "Time to apply a step request (validation, kernels, copy-out)",
            ["transport"],
            buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0),
            registry=r,
        )
        self.bytes_in = Counter("stepd_bytes_in", "Tensor bytes received over HTTP", registry=r)
        self.bytes_out = Counter("stepd_bytes_out", "Tensor bytes sent over HTTP", registry=r)
        self.checkpoint_seconds = Histogram(
            "stepd_checkpoint_seconds",
            "Checkpoint durations",
            ["run", "op"],
            buckets=(0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0),
            registry=r,
        )
        self.staleness = Histogram(
            "stepd_gradient_staleness",
            "Async groups: parameter versions a gradient lagged when applied",
            ["run"],
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.stale_rejected = Counter(
            "stepd_stale_rejected",
            "Async gradients refused beyond max_staleness",
            ["run"],
            registry=r,
        )
        self.iterations = Gauge("stepd_global_step", "Global step", ["run"], registry=r)
        self.autosave_failures = Counter(
            "stepd_autosave_failures", "Autosaves that could not be written", ["run"], registry=r
        )
        device = Gauge("stepd_device_bytes", "Bytes of parameters and state held", registry=r)
        device.set_function(device_bytes)
        held = Gauge("stepd_runs", "Runs held by the server", registry=r)
        held.set_function(runs)
        if live is not None:
            r.register(RunCollector(self, live, per_param))

    def label(self, run: str) -> str:
        """``run``'s label: its name while fewer than ``max_runs`` runs have theirs, else
        ``_other``; the same for the run's whole life."""
        with self._lock:
            got = self._labels.get(run)
            if got is None:
                # a run named "_other" is counted with the others, never labelled alone
                named = self._labelled < self.max_runs and run != OTHER
                got = self._labels[run] = run if named else OTHER
                self._labelled += named
            return got

    def forget_run(self, run: str) -> None:
        """Drop every series labelled with ``run`` (the run was deleted); its label is free
        for a new run."""
        with self._lock:
            got = self._labels.pop(run, None)
            if got != run:  # _other's series are every unlabelled run's: they stay
                return
            self._labelled -= 1
        for metric in (
            self.steps,
            self.skipped,
            self.checkpoint_seconds,
            self.staleness,
            self.stale_rejected,
            self.iterations,
            self.autosave_failures,
        ):
            for labels in _label_sets(metric):
                if labels and labels[0] == run:
                    metric.remove(*labels)


class RunCollector(Collector):
    """Per-run gauges read at scrape time: step rate, bytes, parameters, workers; and, when
    asked for, each parameter's version and last measured norms."""

    def __init__(self, metrics: Metrics, live: Callable[[], Iterable[Any]], per_param: bool):
        self.metrics, self.live, self.per_param = metrics, live, per_param

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauges = {
            "steps_per_second": "Iterations per second, recently",
            "committed_bytes": "Bytes its parameters, state and histories commit",
            "params": "Parameters registered",
            "workers": "Workers seen",
        }
        totals: dict[str, dict[str, float]] = {}
        params = {
            k: GaugeMetricFamily(f"stepd_param_{k}", what, labels=["run", "param"])
            for k, what in (
                ("version", "Steps applied to the parameter"),
                ("grad_norm", "Last measured gradient L2 norm"),
                ("update_norm", "Last measured update L2 norm"),
                ("norm", "Parameter L2 norm at the last measurement"),
            )
        }
        for run in self.live():
            label = self.metrics.label(run.name)
            row = totals.setdefault(label, dict.fromkeys(gauges, 0.0))
            row["steps_per_second"] += run.rate.per_second()
            row["committed_bytes"] += run.committed
            row["params"] += len(run.store.names())
            row["workers"] += len(run.workers.list())
            if self.per_param and label != OTHER:
                for e in run.store.iter_entries():
                    for key, value in (
                        ("version", e.version),
                        ("grad_norm", e.last_grad_norm),
                        ("update_norm", e.last_update_norm),
                        ("norm", e.last_param_norm),
                    ):
                        if value is not None:
                            params[key].add_metric([label, e.name], value)
        for key, what in gauges.items():
            family = GaugeMetricFamily(f"stepd_run_{key}", what, labels=["run"])
            for label, row in totals.items():
                family.add_metric([label], row[key])
            yield family
        if self.per_param:
            yield from params.values()


def _label_sets(metric: MetricWrapperBase) -> list[Sequence[str]]:
    with metric._lock:  # prometheus_client has no public listing of a metric's children
        return list(metric._metrics)
