"""Data-parallel training under torchrun, with a stepd server as the optimizer.

Every process of the job runs this same script; torchrun gives each its ``RANK`` and the
job's ``WORLD_SIZE``. With ``workers="torchrun"`` the processes are the workers of one sync
group: each sends the gradient of its own part of the batch, the server averages them, steps
once (AdamW here) and every process gets the same new weights. No process group, no
all-reduce: the server is where the gradients meet.

    stepd serve --port 8000 &
    torchrun --nproc_per_node=2 examples/torchrun_sync.py --url http://127.0.0.1:8000 --run-name job

Each process trains a small linear model on its share of every global batch (rows
``rank::world``), so the job computes what one process would on the whole batch: the mean of
the per-process mean losses is the mean loss of the global batch. ``--out DIR`` writes each
process's final weights to ``DIR/rank<r>.npz``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from stepd.client.torch import RemoteOptimizer

IN, OUT, GLOBAL_BATCH = 8, 3, 16
LR = 0.05


def make_model() -> torch.nn.Module:
    """The same initial weights in every process (the run keeps the first one's anyway)."""
    torch.manual_seed(0)
    return torch.nn.Linear(IN, OUT)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of ``step``: a noisy fixed linear teacher, the same in every process."""
    g = torch.Generator().manual_seed(1000 + step)
    teacher = torch.linspace(-1.0, 1.0, IN * OUT).reshape(OUT, IN)
    x = torch.randn(GLOBAL_BATCH, IN, generator=g)
    y = x @ teacher.T + 0.1 * torch.randn(GLOBAL_BATCH, OUT, generator=g)
    return x, y


def loss_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=os.environ.get("STEPD_URL", "http://127.0.0.1:8000"))
    p.add_argument("--token", default=os.environ.get("STEPD_TOKEN") or None)
    # not --run: torchrun would take it for an abbreviation of its own --run-path
    p.add_argument("--run-name", default=os.environ.get("STEPD_RUN", "torchrun-example"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="write rank<r>.npz here at the end")
    args = p.parse_args(argv)

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if GLOBAL_BATCH % world:
        raise SystemExit(f"the global batch of {GLOBAL_BATCH} does not split into {world}")
    model = make_model()
    with RemoteOptimizer(
        model.named_parameters(),
        args.url,
        "adamw",
        run=args.run_name,
        token=args.token,
        workers="torchrun",  # worker id = RANK, a sync round of WORLD_SIZE gradients
        lr=LR,
    ) as opt:
        for step in range(args.steps):
            x, y = global_batch(step)
            loss = loss_of(model, x[rank::world], y[rank::world])
            opt.zero_grad()
            loss.backward()
            opt.step()  # waits for every rank's gradient; all get the same weights
            if rank == 0:
                print(f"step {step}: loss of rank 0's part {loss.item():.4f}", flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        weights = {n: t.detach().numpy() for n, t in model.named_parameters()}
        np.savez(args.out / f"rank{rank}.npz", **weights)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
