"""Dependencies shared by the routers (Annotated aliases, as routes read them).

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency on a worker
thread, and a thread hop per dependency costs more than a tiny step itself.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from stepd.wire import MAX_REQUEST_HEADER_BYTES, header_length, parse

from ..engine import Engine


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine


class ErrorBody(BaseModel):
    """Every error reply: ``detail`` says what was wrong (a list for request-shape errors)."""

    detail: str | list[dict[str, Any]] = Field(description="what was wrong with the request")


# Documented on every router, so the OpenAPI schema describes the error replies as they are.
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what}
    for status, what in (
        (400, "the body cannot be parsed at all (not UTF-8 JSON)"),
        (401, "missing or wrong bearer token"),
        (404, "unknown run, parameter, slot, group or checkpoint"),
        (409, "conflicting registration"),
        (413, "body over the size limit"),
        (422, "invalid request"),
    )
}

EngineDep = Annotated[Engine, Depends(get_engine)]


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


# Headers above this are parsed on a worker thread: JSON of many tensors takes a while, and
# on the event loop it would hold up every other request.
INLINE_HEADER_BYTES = 64 * 1024


async def parse_tensors(
    body: bytes | memoryview, codes: tuple[str, ...] = ("F32",)
) -> tuple[dict[str, Any], dict[str, str]]:
    """A request's safetensors body (header capped at ``MAX_REQUEST_HEADER_BYTES``; tensors
    of the dtype ``codes``: a step's gradients may be in the model's precision)."""
    if header_length(body) <= INLINE_HEADER_BYTES:
        return parse(body, MAX_REQUEST_HEADER_BYTES, codes)
    return await run_in_threadpool(parse, body, MAX_REQUEST_HEADER_BYTES, codes)
