"""The data plane: stepping one parameter (raw bytes) or many (safetensors).

These two endpoints carry every training step, so they are served by a bare Starlette app in
front of FastAPI (``stepd.service.app.StepdApp``): FastAPI's per-request machinery costs about a
quarter of a millisecond here, as much as the rest of a tiny step. The FastAPI routes below
describe the same endpoints in the OpenAPI schema and call the same code, so behaviour cannot
drift; the error bodies are the same as everywhere else (the token is checked by StepdApp).
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Header, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.routing import Route

from ..requests import CAPACITY, REQUEST_ID_RE
from ..requests import HEADER as REQUEST_ID
from ..rwlock import WouldBlock
from ..store import Invalid, ParamStore, Stale, StepOutcome
from ..tensors import dump_safetensors, from_bytes, parse_safetensors
from .deps import ERRORS, read_body

OCTET = "application/octet-stream"
SAFETENSORS = "application/x-safetensors"
# Steps up to this many elements run on the event loop when their locks are free: a thread
# hop costs more than the kernel. Anything bigger, or contended, goes to a worker thread.
INLINE_MAX_ELEMENTS = 1 << 16
WORKER_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


async def run_step(
    store: ParamStore,
    grads: dict[str, np.ndarray],
    read_back: bool,
    based_on: dict[str, int] | None = None,
    request_id: str | None = None,
) -> list[StepOutcome]:
    if sum(g.size for g in grads.values()) <= INLINE_MAX_ELEMENTS:
        try:
            return store.step(
                grads, read_back, blocking=False, based_on=based_on, request_id=request_id
            )
        except WouldBlock:
            pass
    return await run_in_threadpool(store.step, grads, read_back, True, based_on, request_id)


def request_id(request: Request) -> str | None:
    """The ``X-Stepd-Request-Id`` header, validated (service/requests.py), if any."""
    value = request.headers.get(REQUEST_ID)
    if value is not None and not REQUEST_ID_RE.fullmatch(value):
        raise Invalid(
            f"invalid X-Stepd-Request-Id {value[:160]!r}: 16-128 letters, digits and _ . : -"
        )
    return value


async def apply(
    request: Request, grads: dict[str, np.ndarray], read_back: bool, versions: dict[str, int]
) -> list[StepOutcome]:
    """Route each gradient by its group's workers mode (service/workers.py)."""
    store: ParamStore = request.app.state.store
    metrics = request.app.state.metrics
    rid = request_id(request)
    worker = request.query_params.get("worker")
    if worker is not None and not WORKER_RE.fullmatch(worker):
        raise Invalid(f"invalid worker id {worker!r}: 1-128 letters, digits and _ . : -")
    entries = {n: store.entry(n) for n in grads}
    sync = [n for n, e in entries.items() if e.group.workers["mode"] == "sync"]
    if sync and worker is None:
        raise Invalid(f"{sync[0]!r} is in a sync group: pass ?worker=<id>")
    missing = [
        n for n, e in entries.items() if e.group.workers["mode"] == "async" and n not in versions
    ]
    if missing:
        raise Invalid(
            f"{missing[0]!r} is in an async group: pass the parameter version its gradient was "
            "computed from (?version=N, or metadata 'versions' in a batch)"
        )
    if worker is not None:
        store.workers.touch(worker, len(grads))
    iteration = _int(request, "iteration")
    rest = {n: g for n, g in grads.items() if n not in sync}
    based_on = {n: v for n, v in versions.items() if n in rest}
    outcomes: dict[str, StepOutcome] = {}
    if rest:
        try:
            for o in await run_step(store, rest, read_back, based_on or None, rid):
                outcomes[o.name] = o
                if o.staleness is not None:
                    metrics.staleness.observe(o.staleness)
        except Stale:
            metrics.stale_rejected.inc()
            raise
    for n in sync:  # every worker sends the same names: the rounds complete in order
        cfg = entries[n].group.workers
        outcomes[n] = await run_in_threadpool(
            store.sync.contribute, n, grads[n], worker, iteration, cfg, rid
        )
    return [outcomes[n] for n in grads]


def _int(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    if not value.lstrip("-").isdigit():
        raise HTTPException(422, f"query parameter {name!r} must be an integer, got {value!r}")
    return int(value)


def _flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "true").lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise HTTPException(422, f"query parameter {name!r} must be a boolean, got {value!r}")


def _count(request: Request, outcomes: list[StepOutcome], body: int, out: int, start: float):
    m = request.app.state.metrics
    store = request.app.state.store
    for o in outcomes:
        if o.replayed:  # a retried request id: counted when it was applied
            continue
        if o.applied:
            m.steps.labels(store.entry(o.name).group.id).inc()
        else:
            m.skipped.inc()
    m.bytes_in.inc(body)
    m.bytes_out.inc(out)
    m.step_seconds.observe(time.perf_counter() - start)


async def step_one(request: Request) -> Response:
    start = time.perf_counter()
    store, settings = request.app.state.store, request.app.state.settings
    name = request.path_params["name"]
    return_param = _flag(request, "return_param")
    entry = store.entry(name)
    body = await read_body(request, settings.max_body_bytes)
    grad = from_bytes(body, entry.shape, f"{name!r} gradient")
    version = _int(request, "version")
    [outcome] = await apply(
        request, {name: grad}, return_param, {} if version is None else {name: version}
    )
    headers = {
        "X-Stepd-Version": str(outcome.version),
        "X-Stepd-Applied": "true" if outcome.applied else "false",
    }
    if not return_param:
        _count(request, [outcome], len(body), 0, start)
        return Response(status_code=204, headers=headers)
    payload = outcome.param.tobytes()
    _count(request, [outcome], len(body), len(payload), start)
    return Response(payload, media_type=OCTET, headers=headers)


async def step_many(request: Request) -> Response:
    start = time.perf_counter()
    settings = request.app.state.settings
    return_params = _flag(request, "return_params")
    body = await read_body(request, settings.max_body_bytes)
    grads, metadata = parse_safetensors(body)
    if not grads:
        raise Invalid("the safetensors body holds no gradients")
    outcomes = await apply(request, grads, return_params, _versions(metadata))
    meta = {
        "versions": {o.name: o.version for o in outcomes},
        "skipped": [o.name for o in outcomes if not o.applied],
    }
    if not return_params:
        _count(request, outcomes, len(body), 0, start)
        return Response(json.dumps(meta), media_type="application/json")
    payload = dump_safetensors(
        {o.name: o.param for o in outcomes}, {k: json.dumps(v) for k, v in meta.items()}
    )
    _count(request, outcomes, len(body), len(payload), start)
    return Response(payload, media_type=SAFETENSORS)


def _versions(metadata: dict[str, str]) -> dict[str, int]:
    if "versions" not in metadata:
        return {}
    try:
        versions = json.loads(metadata["versions"])
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in versions.values()):
            raise TypeError
        return versions
    except (json.JSONDecodeError, TypeError, AttributeError):
        raise Invalid("safetensors metadata 'versions' must be a JSON object of ints") from None


FAST_ROUTES = [
    Route("/v1/params/{name}/step", step_one, methods=["POST"]),
    Route("/v1/step", step_many, methods=["POST"]),
]

# The OpenAPI description of the same endpoints (and a fallback that calls the same code).
router = APIRouter(prefix="/v1", tags=["steps"], responses=ERRORS)

RequestIdHeader = Annotated[
    str | None,
    Header(
        alias="X-Stepd-Request-Id",
        pattern=REQUEST_ID_RE.pattern,
        description=(
            "Makes the step idempotent: a request repeated with the same id (a retry after a "
            "lost reply) is not applied again and gets the reply recorded for the first one. "
            "16-128 letters, digits and _ . : -, unique across clients (the client sends 128 "
            "random bits and a counter); a malformed id is a 422. The server remembers the "
            f"last {CAPACITY} ids."
        ),
    ),
]


@router.post(
    "/params/{name}/step",
    responses={200: {"content": {OCTET: {}}, "description": "the updated parameter"}},
    response_class=Response,
)
async def step(
    name: str,
    request: Request,
    return_param: bool = True,
    worker: str | None = None,
    iteration: int | None = None,
    version: int | None = None,
    x_stepd_request_id: RequestIdHeader = None,
) -> Response:
    """Body: the gradient as raw little-endian float32 bytes. Returns the new parameter
    (headers ``X-Stepd-Version``, ``X-Stepd-Applied``), or 204 with ``return_param=false``.

    ``worker``: the sender's id (required in sync groups); ``iteration``: the sync round
    (default: the current one); ``version``: the parameter version the gradient was computed
    from (required in async groups; stale ones are refused with 409).

    With ``X-Stepd-Request-Id``, a repeated id is not applied again (nor counted again in a
    sync round): the reply carries the versions and applied flags recorded for the first
    delivery and the parameters' current values — for a single client, exactly the first
    reply. An id reused for other parameters is a 409."""
    return await step_one(request)


@router.post(
    "/step",
    responses={200: {"content": {SAFETENSORS: {}}, "description": "updated parameters"}},
    response_class=Response,
)
async def step_batch(
    request: Request,
    return_params: bool = True,
    worker: str | None = None,
    iteration: int | None = None,
    x_stepd_request_id: RequestIdHeader = None,
) -> Response:
    """Body: safetensors of gradients keyed by parameter name; one fused launch per group.

    The reply is a safetensors of the updated parameters whose ``__metadata__`` holds
    ``versions`` and ``skipped`` (JSON), or, with ``return_params=false``, that JSON alone.

    With ``X-Stepd-Request-Id``, a repeated id is not applied again (nor counted again in a
    sync round): the reply carries the versions and applied flags recorded for the first
    delivery and the parameters' current values — for a single client, exactly the first
    reply. An id reused for other parameters is a 409.
    """
    return await step_many(request)
