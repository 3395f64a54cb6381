"""Dependencies shared by the routers (Annotated aliases, as routes read them).

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency on a worker
thread, and four thread hops per request cost more than a tiny step itself.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from pydantic import BaseModel, Field

from ..checkpoints import CheckpointDir
from ..config import Settings
from ..metrics import Metrics
from ..store import ParamStore


async def get_store(request: Request) -> ParamStore:
    return request.app.state.store


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_checkpoints(request: Request) -> CheckpointDir:
    return request.app.state.checkpoints


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


class ErrorBody(BaseModel):
    """Every error reply: ``detail`` says what was wrong (a list for request-shape errors)."""

    detail: str | list[dict[str, Any]] = Field(description="what was wrong with the request")


# Documented on every router, so the OpenAPI schema describes the error replies as they are.
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what}
    for status, what in (
        (400, "the body cannot be parsed at all (not UTF-8 JSON)"),
        (401, "missing or wrong bearer token"),
        (404, "unknown parameter, slot, group or checkpoint"),
        (409, "conflicting registration"),
        (413, "body over the size limit"),
        (422, "invalid request"),
    )
}

StoreDep = Annotated[ParamStore, Depends(get_store)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
CheckpointsDep = Annotated[CheckpointDir, Depends(get_checkpoints)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
