"""/v1/runs: create or join, list, inspect and delete runs; /v1/status: the server."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.concurrency import run_in_threadpool

from ..schemas import RunHistory, RunInfo, RunJoined, RunRequest, RunStats, Status
from .deps import ERRORS, EngineDep

router = APIRouter(prefix="/v1", tags=["runs"], responses=ERRORS)


@router.get("/status", response_model=Status)
async def status(engine: EngineDep) -> Status:
    """The server: version, wire protocol, device, shard, runs, bytes held, limits."""
    return Status(**engine.status())


@router.get("/runs", response_model=list[RunInfo])
async def list_runs(engine: EngineDep) -> list[RunInfo]:
    return [RunInfo(**r) for r in engine.runs()]


@router.post("/runs", status_code=201, response_model=RunJoined)
async def open_run(
    engine: EngineDep, response: Response, body: RunRequest | None = None
) -> RunJoined:
    """Join the named run (200; created if absent: 201), with ``fresh`` delete it first, or
    without a name create an anonymous run, private to its client (201): it is deleted when
    the client closes, or after ``STEPD_ANONYMOUS_RUN_TTL`` idle seconds. The reply names the
    run and announces the server's limits and wire protocol."""
    body = body or RunRequest()
    group = body.group.model_dump(exclude_none=True) if body.group else None
    run, created = await run_in_threadpool(
        engine.open_run, body.name, fresh=body.fresh, group=group, quota=body.quota_bytes
    )
    if not created:
        response.status_code = 200
    status = engine.status()
    return RunJoined(
        **run.info(), protocol=status["protocol"], limits=status["limits"], shard=status["shard"]
    )


@router.get("/runs/{run}", response_model=RunInfo)
async def get_run(run: str, engine: EngineDep) -> RunInfo:
    return RunInfo(**engine.run(run).info())


@router.delete("/runs/{run}", status_code=204, response_class=Response)
async def delete_run(run: str, engine: EngineDep) -> Response:
    """Delete the run and free its memory now. A named run's checkpoints stay on disk (a run
    of the same name sees them again); an anonymous run's go too."""
    await run_in_threadpool(engine.delete_run, run)
    return Response(status_code=204)


@router.get("/runs/{run}/stats", response_model=RunStats)
async def run_stats(run: str, engine: EngineDep) -> RunStats:
    """The run's step, step rate and lr, and every parameter with its last measured norms."""
    return RunStats(**engine.run_stats(run))


@router.get("/runs/{run}/history", response_model=RunHistory)
async def run_history(run: str, engine: EngineDep, after: int | None = None) -> RunHistory:
    """The run's samples (lr, step rate, overall norms), oldest first; with ``after``, only
    those of later steps."""
    return RunHistory(**engine.run_history(run, after))
