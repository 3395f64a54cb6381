"""Prometheus metrics of one server (its own registry, so tests can build many apps).

Everything a run does carries a ``run`` label; a deleted run's series go with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase


class Metrics:
    def __init__(self, device_bytes: Callable[[], int], runs: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
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
        live = Gauge("stepd_runs", "Runs held by the server", registry=r)
        live.set_function(runs)

    def forget_run(self, run: str) -> None:
        """Drop every series labelled with ``run`` (the run was deleted)."""
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


def _label_sets(metric: MetricWrapperBase) -> list[Sequence[str]]:
    with metric._lock:  # prometheus_client has no public listing of a metric's children
        return list(metric._metrics)
