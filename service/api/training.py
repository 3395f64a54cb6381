"""/v1/runs/{run}: the iteration, lr, workers, groups and a group's optimizer state."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from stepd.wire import STATE_CODES

from ..schemas import Iteration, LrRequest, Membership
from .deps import ERRORS, EngineDep, parse_tensors, read_body

router = APIRouter(prefix="/v1/runs/{run}", tags=["training"], responses=ERRORS)


@router.post("/iteration/end", response_model=Iteration, response_model_exclude_none=True)
async def end_iteration(run: str, engine: EngineDep, worker: str | None = None) -> Iteration:
    """Advance the run's global step (rlx-optim's ``end_iteration``); returns the new step.

    With sync groups, each worker passes ``?worker=<id>`` and the call is a barrier: it
    returns once all of them have called it (the last one advances the step). Every
    ``autosave_every`` iterations this also writes ``auto-<step>`` and keeps the newest
    ``autosave_keep`` automatic checkpoints.
    """
    waiting = await run_in_threadpool(engine.start_end_iteration, run, worker)
    end = await waiting.wait_async()  # a barrier: the other workers are awaited, not a thread
    return Iteration(
        global_step=end.step,
        autosaved=end.autosaved,
        autosave_error=end.autosave_error,
        dropped=list(end.dropped) or None,
    )


@router.put("/lr")
async def set_lr(run: str, body: LrRequest, engine: EngineDep) -> dict[str, Any]:
    """Set the learning rate of one group, or of every group of the run when ``group`` is
    absent."""
    groups = await run_in_threadpool(engine.set_lr, run, body.lr, body.group)
    return {"lr": body.lr, "groups": groups}


@router.patch("/groups/{group_id}/hyperparams")
async def set_hyperparams(
    run: str, group_id: str, body: dict[str, Any], engine: EngineDep
) -> dict[str, Any]:
    """Change hyperparameters of a group other than its lr (which ``PUT /lr`` sets), e.g.
    ``{"betas": [0.85, 0.99]}`` from a scheduler cycling momentum; the state stays as it is
    (a change of its layout, such as ``amsgrad``, is a 422). Applies from the next step and
    is saved in checkpoints; the group keeps its id. Returns every hyperparameter now."""
    return await run_in_threadpool(engine.set_hyperparams, run, group_id, body)


@router.get("/workers")
async def workers(run: str, engine: EngineDep) -> list[dict[str, Any]]:
    """The workers seen so far: id, first and last seen (Unix time), gradients sent."""
    return engine.workers(run)


@router.get("/membership", response_model=Membership)
async def membership(run: str, engine: EngineDep) -> Membership:
    """The sync membership: the running iteration, its members, who joins the next one and
    who was dropped from this one."""
    return Membership(**engine.membership(run).to_dict())


@router.post("/workers/{worker}/join", response_model=Membership)
async def join(run: str, worker: str, engine: EngineDep) -> Membership:
    """Make the worker a sync member: of the running iteration if it has not started (its
    first gradient or end_iteration fixes the membership), else of the next one — the reply
    then comes once that iteration begins (``member_from``), a 504 after the group's
    ``timeout_s``. Joining again is harmless; a dropped worker joins again this way."""
    waiting = await run_in_threadpool(engine.join, run, worker)
    return Membership(**(await waiting.wait_async()).to_dict())


@router.post("/workers/{worker}/leave", response_model=Membership)
async def leave(run: str, worker: str, engine: EngineDep) -> Membership:
    """The worker leaves the sync membership now: what it sent this iteration counts, and no
    round or barrier waits for it any more."""
    return Membership(**(await run_in_threadpool(engine.leave, run, worker)).to_dict())


@router.post("/workers/{worker}/heartbeat", response_model=Membership)
async def heartbeat(run: str, worker: str, engine: EngineDep) -> Membership:
    """The worker is alive: its lease (``lease_s``) starts again. Every step and
    end_iteration does this too; call it while idle longer than the lease (409 if the worker
    was dropped: join again)."""
    return Membership(**engine.heartbeat(run, worker).to_dict())


@router.get("/groups")
async def groups(run: str, engine: EngineDep) -> list[dict[str, Any]]:
    return engine.groups(run)


@router.put(
    "/groups/{group_id}/state",
    status_code=204,
    response_class=Response,
    summary="Replace a group's optimizer state (load_state_dict)",
)
async def load_group_state(
    run: str, group_id: str, request: Request, engine: EngineDep
) -> Response:
    """The body is safetensors: tensors ``{param}/{slot}`` (float32, the slot's shape) and
    ``__metadata__`` whose values are JSON: ``algorithm`` and ``hyperparams`` (the group's,
    else 409), ``counts`` ``{param: count}``, ``shapes`` ``{param: shape}`` (the registered
    shapes, else 409), and optionally ``lr``, ``lr_scales``,
    ``global_step`` (run-wide: every group of the run gets it) and ``replace`` (default true:
    the group's parameters absent from ``counts`` lose their state; false: only the named
    ones change). Every named parameter must be registered in this group (404 / 409), each
    slot of the algorithm's shape for it (422). Parameter values and versions are untouched.
    Validated completely before anything changes; 204 on success."""
    body = await read_body(request, engine.settings.max_body_bytes)
    tensors, meta = await parse_tensors(body, STATE_CODES)  # 8-bit state: uint8 codes
    await run_in_threadpool(engine.load_group_state, run, group_id, tensors, meta)
    return Response(status_code=204)
