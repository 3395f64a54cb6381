"""A small training loop stepping a real server from a thread (the dashboard's tests)."""

from __future__ import annotations

import threading

import numpy as np

import stepd

SHAPES = {
    "encoder.weight": (32, 16),
    "encoder.bias": (32,),
    "decoder.weight": (8, 32),
    "decoder.bias": (8,),
    "head.weight": (2, 8),
    "head.bias": (2,),
}


class Training(threading.Thread):
    """Steps every parameter of :data:`SHAPES` on a noisy quadratic, then ends the iteration,
    every ``pause`` seconds until :meth:`stop`; ``steps`` counts the iterations."""

    def __init__(
        self, url: str, run: str = "train", token: str | None = None, pause: float = 0.02
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.run_name, self.token, self.pause = url, run, token, pause
        self.steps = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._ready = threading.Event()

    def run(self) -> None:
        try:
            self._train()
        except BaseException as exc:  # the test reports it
            self.error = exc
            self._ready.set()

    def _train(self) -> None:
        rng = np.random.default_rng(0)
        opt = stepd.connect(
            self.url, run=self.run_name, token=self.token, worker="trainer-0", lr=0.05
        )
        params = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
        targets = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
        try:
            while not self._halt.is_set():
                for name, p in params.items():
                    noise = 0.1 * rng.standard_normal(p.shape).astype(np.float32)
                    opt.step(name, p.shape, p, p - targets[name] + noise)
                opt.end_iteration()
                self.steps += 1
                self._ready.set()
                self._halt.wait(self.pause)
        finally:
            opt.close()

    def wait_started(self, timeout: float = 30) -> None:
        """Until the first iteration ended (or the loop failed: raised here)."""
        self._ready.wait(timeout)
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._halt.set()
        self.join(30)
        if self.error is not None:
            raise self.error

    def __enter__(self) -> Training:
        self.start()
        self.wait_started()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
