"""A training worker that hands its optimizer to a stepd server over HTTP.

The model is a linear regression in NumPy (``W x + b`` fitted to a fixed random teacher);
the worker computes its gradients locally and sends them with ``step_batch``; the server
applies AdamW and replies with the updated parameters, written into the worker's arrays.

    stepd serve --port 8000 &
    python examples/worker.py --url http://127.0.0.1:8000 --steps 200

Workers given the same ``--run`` (default ``example``) share one model: the first registers
the parameters, the next ones get the server's copy (registration is idempotent), and every
gradient is applied as it arrives (Hogwild-style). Give each worker its own ``--run`` for
independent models on one server. The URL, token and run also come from ``STEPD_URL``,
``STEPD_TOKEN`` and ``STEPD_RUN``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from stepd.client import TransportError, connect

IN, OUT = 16, 4


def connect_with_retry(url: str, wait_s: float, **kw):
    """``connect`` until the server answers (a container may start before it listens)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return connect(url, **kw)
        except TransportError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=os.environ.get("STEPD_URL", "http://127.0.0.1:8000"))
    p.add_argument("--token", default=os.environ.get("STEPD_TOKEN") or None)
    p.add_argument("--run", default=os.environ.get("STEPD_RUN", "example"), help="shared run")
    p.add_argument("--prefix", default="model", help="parameter name prefix")
    p.add_argument("--worker", type=int, default=0, help="worker id: seeds this worker's data")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds between steps")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the server")
    args = p.parse_args(argv)

    teacher = np.random.default_rng(1234)  # the same task for every worker
    w_true = teacher.normal(size=(OUT, IN)).astype(np.float32)
    b_true = teacher.normal(size=OUT).astype(np.float32)
    data = np.random.default_rng(args.worker)  # each worker its own samples

    # Every worker starts from the same values, so whoever registers first, the model is the same.
    weight = np.zeros((OUT, IN), np.float32)
    bias = np.zeros(OUT, np.float32)
    names = (f"{args.prefix}.weight", f"{args.prefix}.bias")

    opt = connect_with_retry(
        args.url,
        args.wait,
        algorithm="adamw",
        run=args.run,
        token=args.token,
        lr=args.lr,
        weight_decay=0.0,
    )
    first = loss = float("nan")
    with opt:
        for step in range(1, args.steps + 1):
            x = data.normal(size=(args.batch, IN)).astype(np.float32)
            y = x @ w_true.T + b_true + 0.01 * data.normal(size=(args.batch, OUT))
            err = x @ weight.T + bias - y  # mean squared error, gradients by hand
            loss = float(np.mean(err**2))
            g = (2.0 / err.size) * err
            grad_w = (g.T @ x).astype(np.float32)
            grad_b = g.sum(axis=0).astype(np.float32)
            opt.step_batch(
                [(names[0], weight.shape, weight, grad_w), (names[1], bias.shape, bias, grad_b)]
            )  # weight and bias now hold the server's updated values
            opt.end_iteration()
            if step == 1:
                first = loss
            if step == 1 or step % args.log_every == 0 or step == args.steps:
                print(f"worker {args.worker} step {step:5d} loss {loss:.6f}", flush=True)
            if args.sleep:
                time.sleep(args.sleep)
    print(f"worker {args.worker} done: loss {first:.6f} -> {loss:.6f}", flush=True)
    return 0 if loss < first else 1


if __name__ == "__main__":
    sys.exit(main())
