"""/v1/runs/{run}/checkpoints: create, list, restore, delete (the run's own folder)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from ..schemas import Checkpoint, CheckpointRequest
from .deps import ERRORS, EngineDep

router = APIRouter(prefix="/v1/runs/{run}/checkpoints", tags=["checkpoints"], responses=ERRORS)


@router.post("", status_code=201, response_model=Checkpoint)
async def create(run: str, engine: EngineDep, body: CheckpointRequest | None = None) -> Checkpoint:
    """Save params and every state slot; an existing checkpoint of that name is replaced."""
    name = body.name if body else None
    info = await run_in_threadpool(engine.save_checkpoint, run, name)
    return Checkpoint(**info.to_dict())


@router.get("", response_model=list[Checkpoint])
def list_checkpoints(run: str, engine: EngineDep) -> list[Checkpoint]:
    return [Checkpoint(**i.to_dict()) for i in engine.checkpoints(run)]


@router.post("/{name}/restore", response_model=Checkpoint)
async def restore(run: str, name: str, engine: EngineDep) -> Checkpoint:
    """Bring back exactly the saved state (params, slots, step, lr, lr_scales)."""
    info = await run_in_threadpool(engine.restore_checkpoint, run, name)
    return Checkpoint(**info.to_dict())


@router.delete("/{name}", status_code=204, response_class=Response)
def delete(run: str, name: str, engine: EngineDep) -> Response:
    engine.delete_checkpoint(run, name)
    return Response(status_code=204)
