"""/v1/checkpoints: create, list, restore, delete."""

from __future__ import annotations

import time

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from ..checkpoints import CheckpointDir
from ..metrics import Metrics
from ..schemas import Checkpoint, CheckpointRequest
from ..store import ParamStore
from .deps import ERRORS, CheckpointsDep, MetricsDep, StoreDep

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"], responses=ERRORS)


def save_checkpoint(
    store: ParamStore, ckpts: CheckpointDir, metrics: Metrics, name: str | None
) -> Checkpoint:
    start = time.perf_counter()
    info = store.write_snapshot(lambda tensors, meta: ckpts.save(tensors, meta, name))
    metrics.checkpoint_seconds.labels("save").observe(time.perf_counter() - start)
    return Checkpoint(**info.to_dict())


@router.post("", status_code=201, response_model=Checkpoint)
async def create(
    store: StoreDep,
    ckpts: CheckpointsDep,
    metrics: MetricsDep,
    body: CheckpointRequest | None = None,
) -> Checkpoint:
    """Save params and every state slot; an existing checkpoint of that name is replaced."""
    name = body.name if body else None
    if name is not None:
        ckpts.path(name)  # validate before the (possibly long) snapshot
    return await run_in_threadpool(save_checkpoint, store, ckpts, metrics, name)


@router.get("", response_model=list[Checkpoint])
def list_checkpoints(ckpts: CheckpointsDep) -> list[Checkpoint]:
    return [Checkpoint(**i.to_dict()) for i in ckpts.list()]


@router.post("/{name}/restore", response_model=Checkpoint)
async def restore(
    name: str, store: StoreDep, ckpts: CheckpointsDep, metrics: MetricsDep
) -> Checkpoint:
    """Bring back exactly the saved state (params, slots, step, lr, lr_scales)."""

    def run() -> Checkpoint:
        start = time.perf_counter()
        tensors, meta = ckpts.load(name)
        store.restore(tensors, meta)
        metrics.checkpoint_seconds.labels("restore").observe(time.perf_counter() - start)
        metrics.iterations.set(store.global_step)
        info = next(i for i in ckpts.list() if i.name == name)
        return Checkpoint(**info.to_dict())

    return await run_in_threadpool(run)


@router.delete("/{name}", status_code=204, response_class=Response)
def delete(name: str, ckpts: CheckpointsDep) -> Response:
    ckpts.delete(name)
    return Response(status_code=204)
