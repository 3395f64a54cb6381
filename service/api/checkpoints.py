"""/v1/runs/{run}/checkpoints: create, list, restore, delete (the run's own folder)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from ..schemas import Checkpoint, CheckpointActivity, CheckpointRequest, InvalidCheckpoint
from .deps import ERRORS, EngineDep

router = APIRouter(prefix="/v1/runs/{run}/checkpoints", tags=["checkpoints"], responses=ERRORS)


@router.post("", status_code=201, response_model=Checkpoint)
async def create(run: str, engine: EngineDep, body: CheckpointRequest | None = None) -> Checkpoint:
    """Save params and every state slot; an existing checkpoint of that name is replaced."""
    name = body.name if body else None
    info = await run_in_threadpool(engine.save_checkpoint, run, name)
    return Checkpoint(**info.to_dict())


@router.get("", response_model=list[Checkpoint])
async def list_checkpoints(run: str, engine: EngineDep) -> list[Checkpoint]:
    """The valid checkpoints, oldest first. Files of the folder that are not (symlinks,
    FIFOs, folders, empty or torn files, bad headers) are left out: see ``/invalid``."""
    infos = await run_in_threadpool(engine.checkpoints, run)
    return [Checkpoint(**i.to_dict()) for i in infos]


@router.get("/invalid", response_model=list[InvalidCheckpoint])
async def list_invalid(run: str, engine: EngineDep) -> list[InvalidCheckpoint]:
    """Every ``<name>.safetensors`` entry of the run's folder that the listing leaves out,
    with the reason: ``[{"name": "x.safetensors", "reason": "empty (0 bytes)"}]``. None of
    them is ever opened for its data; one with a valid name can be removed with ``DELETE
    /checkpoints/{name}`` (a symlink itself, not its target; a folder never). Hidden files
    (a save's temporaries) and other suffixes are not reported."""
    invalid = await run_in_threadpool(engine.invalid_checkpoints, run)
    return [InvalidCheckpoint(**i.to_dict()) for i in invalid]


@router.get("/activity", response_model=CheckpointActivity | None)
async def activity(run: str, engine: EngineDep) -> CheckpointActivity | None:
    """The save or restore of one of the run's checkpoints under way, with its progress in
    bytes (``null`` when none is): what ``stepd checkpoints RUN save|restore`` draws its
    progress bar from."""
    now = engine.checkpoint_activity(run)
    return None if now is None else CheckpointActivity(**now.to_dict())


@router.post("/{name}/restore", response_model=Checkpoint)
async def restore(run: str, name: str, engine: EngineDep) -> Checkpoint:
    """Bring back exactly the saved state (params, slots, step, lr, lr_scales): all or
    nothing. The reply describes the file that was read; a checkpoint deleted meanwhile is
    either restored in full or answered 404 with nothing changed."""
    info = await run_in_threadpool(engine.restore_checkpoint, run, name)
    return Checkpoint(**info.to_dict())


@router.delete("/{name}", status_code=204, response_class=Response)
async def delete(run: str, name: str, engine: EngineDep) -> Response:
    await run_in_threadpool(engine.delete_checkpoint, run, name)
    return Response(status_code=204)
