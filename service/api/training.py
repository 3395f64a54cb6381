"""/v1/iteration, /v1/lr, /v1/groups (and a group's optimizer state), /v1/status: the run's
global state."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from ..checkpoints import AUTO_PREFIX
from ..schemas import Iteration, LrRequest, ShardView, Status
from ..tensors import parse_safetensors
from .checkpoints import save_checkpoint
from .deps import ERRORS, CheckpointsDep, MetricsDep, SettingsDep, StoreDep, read_body

router = APIRouter(prefix="/v1", tags=["training"], responses=ERRORS)


@router.post("/iteration/end", response_model=Iteration)
async def end_iteration(
    store: StoreDep,
    metrics: MetricsDep,
    settings: SettingsDep,
    ckpts: CheckpointsDep,
    worker: str | None = None,
) -> Iteration:
    """Advance the global step (rlx-optim's ``end_iteration``); returns the new step.

    With sync groups, each worker passes ``?worker=<id>`` and the call is a barrier: it
    returns once all of them have called it (the last one advances the step). Every
    ``autosave_every`` iterations this also writes ``auto-<step>`` and keeps the newest
    ``autosave_keep`` automatic checkpoints.
    """
    count = store.sync_count()
    if worker is not None and count is not None:
        store.workers.touch(worker)
        step, advanced = await run_in_threadpool(
            store.sync.end_iteration, worker, count, store.sync_timeout()
        )
        if not advanced:  # another worker's call advanced it (and autosaves)
            return Iteration(global_step=step)
    else:
        step = await run_in_threadpool(store.end_iteration)
    metrics.iterations.set(step)
    every = settings.autosave_every
    if every and step % every == 0:

        def autosave() -> None:
            save_checkpoint(store, ckpts, metrics, f"{AUTO_PREFIX}{step:08d}")
            ckpts.prune_auto(settings.autosave_keep)

        await run_in_threadpool(autosave)
    return Iteration(global_step=step)


@router.put("/lr")
async def set_lr(body: LrRequest, store: StoreDep) -> dict[str, Any]:
    """Set the learning rate of one group, or of every group when ``group`` is absent."""
    groups = await run_in_threadpool(store.set_lr, body.lr, body.group)
    return {"lr": body.lr, "groups": groups}


@router.get("/workers")
async def workers(store: StoreDep) -> list[dict[str, Any]]:
    """The workers seen so far: id, first and last seen (Unix time), gradients sent."""
    return store.workers.list()


@router.get("/groups")
async def groups(store: StoreDep) -> list[dict[str, Any]]:
    return store.groups()


@router.put(
    "/groups/{group_id}/state",
    status_code=204,
    response_class=Response,
    summary="Replace a group's optimizer state (load_state_dict)",
)
async def load_group_state(
    group_id: str, request: Request, store: StoreDep, settings: SettingsDep
) -> Response:
    """The body is safetensors: tensors ``{param}/{slot}`` (float32, the slot's shape) and
    ``__metadata__`` whose values are JSON: ``algorithm`` and ``hyperparams`` (the group's,
    else 409), ``counts`` ``{param: count}``, ``shapes`` ``{param: shape}`` (the registered
    shapes, else 409), and optionally ``lr``, ``lr_scales``,
    ``global_step`` (server-wide: every group gets it) and ``replace`` (default true: the
    group's parameters absent from ``counts`` lose their state; false: only the named ones
    change). Every named parameter must be registered in this group (404 / 409), each slot
    of the algorithm's shape for it (422). Parameter values and versions are untouched.
    Validated completely before anything changes; 204 on success."""
    body = await read_body(request, settings.max_body_bytes)
    tensors, meta = parse_safetensors(body)
    await run_in_threadpool(store.load_group_state, group_id, tensors, meta)
    return Response(status_code=204)


@router.get("/status", response_model=Status)
async def status(store: StoreDep) -> Status:
    return Status(
        global_step=store.global_step,
        shard=ShardView(index=store.shard[0], count=store.shard[1]),
        device=store.backend.name,
        params=len(store.names()),
        device_bytes=store.device_bytes(),
        groups=store.groups(),
    )
