"""Data-parallel training under Ray Train, with stepd shards (Ray actors) as the optimizer.

The driver starts a :class:`stepd.ray.StepdCluster` of ``--shards`` servers, then a
``TorchTrainer`` of ``--workers`` processes. Each worker's ``RemoteOptimizer`` reaches the
shards by the cluster's name (``ray://<name>``) and joins one sync group: worker id = its
world rank, count = the world size. Each sends the gradient of its own rows of every global
batch, the shards average them, step once (AdamW) and every worker gets the same weights —
no all-reduce in the training loop: the shards are where the gradients meet.

    pip install 'stepd[ray,torch]' 'ray[train]>=2.9'
    python examples/ray_train_sync.py --workers 2 --shards 2     # a local Ray cluster
    python examples/ray_train_sync.py --address auto              # an existing one

On a cluster of several nodes ``--checkpoint-dir`` must be a path every node shares: a shard
that dies is restarted by Ray, maybe elsewhere, from its newest autosave.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import OrderedDict
from typing import Any

import ray
import ray.train
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer
from stepd.client.torch import RemoteOptimizer

from stepd.ray import StepdCluster

IN, HIDDEN, OUT, GLOBAL_BATCH = 8, 16, 3, 16
LR = 0.05


def make_model() -> torch.nn.Module:
    """The same initial weights in every worker (the run keeps the first one's anyway).

    Four tensors, so that 2 or 3 shards each own one (a shard that owns none keeps the
    run's step too: the workers announce their sync config when they connect).
    """
    torch.manual_seed(0)
    layers = [("hidden", torch.nn.Linear(IN, HIDDEN)), ("act", torch.nn.Tanh())]
    return torch.nn.Sequential(OrderedDict([*layers, ("out", torch.nn.Linear(HIDDEN, OUT))]))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of ``step``: a noisy fixed linear teacher, the same in every worker."""
    g = torch.Generator().manual_seed(1000 + step)
    teacher = torch.linspace(-1.0, 1.0, IN * OUT).reshape(OUT, IN)
    x = torch.randn(GLOBAL_BATCH, IN, generator=g)
    y = x @ teacher.T + 0.1 * torch.randn(GLOBAL_BATCH, OUT, generator=g)
    return x, y


def train_loop_per_worker(config: dict[str, Any]) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = make_model()
    with RemoteOptimizer(
        model.named_parameters(),
        f"ray://{config['cluster']}",  # the shards, found through Ray
        "adamw",
        run=config["run"],
        worker=str(rank),
        workers={"mode": "sync", "count": world},
        lr=LR,
    ) as opt:
        for step in range(config["steps"]):
            x, y = global_batch(step)
            # rows rank::world: the mean of the workers' mean losses is the global batch's
            loss = torch.nn.functional.mse_loss(model(x[rank::world]), y[rank::world])
            opt.zero_grad()
            loss.backward()
            opt.step()  # waits for every worker's gradient; all get the same weights
            ray.train.report({"step": step, "loss": loss.item()})
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    # the same in every worker: one sync group, one step per iteration on the shards
    print(f"rank {rank}: final weights sum {weights.double().sum().item():.9f}", flush=True)
    if config.get("out"):  # raw float32 bytes, one file per rank (the test compares them)
        weights.numpy().tofile(f"{config['out']}/rank{rank}.f32")


def train(workers: int, shards: int, steps: int, checkpoints: str, out: str | None = None) -> None:
    """Start the shards on the connected Ray cluster, train, stop the shards."""
    cluster = StepdCluster.start(
        "ray-train-example",
        shards,
        checkpoints,
        resources_per_shard={"num_cpus": 0.25},
        device="cpu",
    )
    try:
        print("stepd shards:", cluster.urls(), flush=True)
        config = {"cluster": cluster.name, "run": "ray-train", "steps": steps, "out": out}
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.25}),
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        print("trained", flush=True)
    finally:
        cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default=None, help="a Ray cluster (default: start one here)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--checkpoint-dir", default=None, help="shared by every node")
    args = p.parse_args(argv)

    ray.init(address=args.address)
    try:
        checkpoints = args.checkpoint_dir or tempfile.mkdtemp(prefix="stepd-ray-")
        train(args.workers, args.shards, args.steps, checkpoints)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
