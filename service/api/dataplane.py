"""The data plane: stepping one parameter (raw bytes) or many (safetensors).

These two endpoints carry every training step, so they are served by a bare ASGI app in
front of FastAPI (:mod:`.lean`, mounted by ``stepd.service.app.StepdApp``): FastAPI's and
Starlette's per-request layers cost more than the rest of a tiny step. Each front reads its
request into a :class:`Call` and sends the :class:`Reply`; the FastAPI routes below describe
the same endpoints in the OpenAPI schema and call the same code, so behaviour cannot drift;
the error bodies are the same as everywhere else (the token is checked by StepdApp).
The rules of a step (worker modes, replays, staleness, metrics) are the engine's.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Header, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool

from stepd.wire import (
    APPLIED_HEADER,
    DROPPED_HEADER,
    DTYPE_HEADER,
    GRAD_CODES,
    OCTET,
    REQUEST_ID_HEADER,
    REQUEST_ID_RE,
    SAFETENSORS,
    STALE_HEADER,
    VERSION_HEADER,
    dtype_named,
    dump,
    dump_parts,
    from_bytes,
)

from ..engine import Engine
from ..entries import StepOutcome
from ..errors import Invalid
from ..requests import CAPACITY
from ..rwlock import WouldBlock
from ..schemas import PullRequest
from .deps import ERRORS, parse_tensors, read_body

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Call:
    """What a step reads of its request, the same from either front: the bare ASGI app of
    :mod:`.lean` or FastAPI's route (:meth:`of`). ``headers``: lower-case names."""

    engine: Engine
    run: str
    name: str | None
    query: Mapping[str, str]
    headers: Mapping[str, str]

    @classmethod
    def of(cls, request: Request) -> Call:
        params = request.path_params
        return cls(
            request.app.state.engine,
            params["run"],
            params.get("name"),
            request.query_params,
            request.headers,
        )


@dataclass(frozen=True)
class Reply:
    """A step's answer, for its front to send: ``payload`` bytes, an array, or a list of
    byte parts (a safetensors header and its arrays' memory); arrays are sent as they lie,
    never copied into one bytes object (whose fresh pages cost more than the copy)."""

    status: int
    headers: dict[str, str]
    payload: bytes | np.ndarray | list[bytes | memoryview] = b""
    media_type: str | None = None

    def parts(self) -> list[bytes | memoryview]:
        """The payload's bytes, in order."""
        payload = self.payload
        if isinstance(payload, bytes):
            return [payload]
        if isinstance(payload, np.ndarray):
            return [payload.reshape(-1).data.cast("B")]
        return payload

    def response(self) -> Response:
        return Response(b"".join(self.parts()), self.status, self.headers, self.media_type)


Body = Callable[[], Awaitable[bytes | memoryview]]  # the request body, read when called


async def apply(
    call: Call, grads: dict[str, np.ndarray], read_back: bool, versions: dict[str, int]
) -> list[StepOutcome]:
    engine, query = call.engine, call.query
    return_dtype = query.get("return_dtype")
    step = partial(
        engine.start_step,
        call.run,
        grads,
        worker=query.get("worker"),
        iteration=_int(query, "iteration"),
        versions=versions,
        read_back=read_back,
        request_id=call.headers.get(REQUEST_ID_HEADER),
        return_dtype=None if return_dtype is None else _dtype(return_dtype, "return_dtype"),
        last=_flag(query, "last", "false"),
    )
    try:  # on the event loop when the engine knows it is cheap: a thread hop costs more
        waiting = step(blocking=False)
    except WouldBlock:
        waiting = await run_in_threadpool(step)
    # A sync round: wait for the other workers here, not on a thread (hundreds may wait).
    return await waiting.wait_async()


def _dtype(value: str, what: str) -> np.dtype:
    try:
        return dtype_named(value)
    except ValueError as exc:
        raise Invalid(f"{what}: {exc}") from None


def _int(query: Mapping[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None:
        return None
    digits = value.removeprefix("-")
    if not (digits.isascii() and digits.isdigit()):  # "²".isdigit() is True, int("²") fails
        raise HTTPException(422, f"query parameter {name!r} must be an integer, got {value!r}")
    return int(value)


def _flag(query: Mapping[str, str], name: str, default: str = "true") -> bool:
    value = query.get(name, default).lower()
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise HTTPException(422, f"query parameter {name!r} must be a boolean, got {value!r}")


def _count_bytes(engine: Engine, body: int, out: int) -> None:
    engine.metrics.bytes_in.inc(body)
    engine.metrics.bytes_out.inc(out)


async def step_one(call: Call, read: Body) -> Reply:
    engine, name = call.engine, call.name
    assert name is not None
    return_param = _flag(call.query, "return_param")
    entry = engine.entry(call.run, name)
    body = await read()
    dtype = _dtype(call.headers.get(DTYPE_HEADER, "float32"), DTYPE_HEADER)
    grad = from_bytes(body, entry.shape, f"{name!r} gradient", dtype)
    version = _int(call.query, "version")
    [outcome] = await apply(
        call, {name: grad}, return_param, {} if version is None else {name: version}
    )
    headers = {
        VERSION_HEADER: str(outcome.version),
        APPLIED_HEADER: "true" if outcome.applied else "false",
    }
    if outcome.stale:
        headers[STALE_HEADER] = "true"
    if outcome.dropped:
        headers[DROPPED_HEADER] = ",".join(outcome.dropped)
    if not return_param:
        _count_bytes(engine, len(body), 0)
        return Reply(204, headers)
    param = outcome.param
    assert param is not None
    # The outcome's array is this reply's own copy (read under the step's lock): its bytes
    # go out as they lie, C-contiguous in its dtype, with no second copy.
    payload = param if param.flags.c_contiguous else np.ascontiguousarray(param)
    _count_bytes(engine, len(body), payload.nbytes)
    return Reply(200, headers, payload, OCTET)


async def step_many(call: Call, read: Body) -> Reply:
    engine = call.engine
    engine.run(call.run)  # an unknown run is a 404 before the body is read
    return_params = _flag(call.query, "return_params")
    body = await read()
    grads, metadata = await parse_tensors(body, GRAD_CODES)
    if not grads:
        raise Invalid("the safetensors body holds no gradients")
    outcomes = await apply(call, grads, return_params, _versions(metadata))
    meta: dict[str, Any] = {
        "versions": {o.name: o.version for o in outcomes},
        "skipped": [o.name for o in outcomes if not o.applied and not o.stale],
    }
    stale = [o.name for o in outcomes if o.stale]
    if stale:  # async groups only: absent otherwise
        meta["stale"] = stale
    dropped = sorted({w for o in outcomes for w in o.dropped})
    if dropped:  # sync groups whose iteration went on without a worker: absent otherwise
        meta["dropped"] = dropped
    if not return_params:
        _count_bytes(engine, len(body), 0)
        return Reply(200, {}, json.dumps(meta).encode(), "application/json")
    params = {o.name: o.param for o in outcomes if o.param is not None}
    parts = dump_parts(params, {k: json.dumps(v) for k, v in meta.items()})
    _count_bytes(engine, len(body), sum(len(part) for part in parts))
    return Reply(200, {}, parts, SAFETENSORS)


def _versions(metadata: dict[str, str]) -> dict[str, int]:
    if "versions" not in metadata:
        return {}
    try:
        versions = json.loads(metadata["versions"])
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in versions.values()):
            raise TypeError
        return versions
    except (ValueError, TypeError, AttributeError, RecursionError):  # ValueError: a huge int
        raise Invalid("safetensors metadata 'versions' must be a JSON object of ints") from None


# The OpenAPI description of the same endpoints (and a fallback that calls the same code).
router = APIRouter(prefix="/v1/runs/{run}", tags=["steps"], responses=ERRORS)

RequestIdHeader = Annotated[
    str | None,
    Header(
        alias="X-Stepd-Request-Id",
        pattern=REQUEST_ID_RE.pattern,
        description=(
            "Makes the step idempotent: a request repeated with the same id (a retry after a "
            "lost reply) is not applied again and gets the reply recorded for the first one. "
            "16-128 letters, digits and _ . : -, unique across clients (the client sends 128 "
            "random bits and a counter); a malformed id is a 422. The run remembers its "
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
    run: str,
    name: str,
    request: Request,
    return_param: bool = True,
    worker: str | None = None,
    iteration: int | None = None,
    version: int | None = None,
    return_dtype: str | None = None,
    last: bool = False,
    x_stepd_request_id: RequestIdHeader = None,
    x_stepd_dtype: Annotated[str | None, Header(alias="X-Stepd-Dtype")] = None,
) -> Response:
    """Body: the gradient as raw little-endian bytes, float32 unless the ``X-Stepd-Dtype``
    header says ``bfloat16`` or ``float16`` (the model's precision: half the bytes). Returns
    the new parameter (headers ``X-Stepd-Version``, ``X-Stepd-Applied``) in the gradient's
    precision unless ``return_dtype`` names another (rounded to nearest even from the
    float32 master weights), or 204 with ``return_param=false``.

    ``worker``: the sender's id (required in sync groups); ``iteration``: the sync round
    (default: the current one); ``last``: in sync groups, the worker's last gradients of the
    iteration (rounds of parameters it did not use go on without it); a sync reply names the
    workers dropped from the iteration in ``X-Stepd-Dropped``; ``version``: the parameter
    version the gradient was computed from (required in async groups). A gradient more than
    ``max_staleness`` versions behind is not applied, and that is not an error (the worker
    only lagged): the reply is a 200 with ``X-Stepd-Applied: false``, ``X-Stepd-Stale:
    true``, the current parameter and its version, to compute the next gradient from.

    With ``X-Stepd-Request-Id``, a repeated id is not applied again (nor counted again in a
    sync round): the reply carries the versions and applied flags recorded for the first
    delivery and the parameters' current values — for a single client, exactly the first
    reply. An id reused for other parameters is a 409."""
    limit = request.app.state.engine.settings.max_body_bytes
    return (await step_one(Call.of(request), lambda: read_body(request, limit))).response()


@router.post(
    "/step",
    responses={200: {"content": {SAFETENSORS: {}}, "description": "updated parameters"}},
    response_class=Response,
)
async def step_batch(
    run: str,
    request: Request,
    return_params: bool = True,
    worker: str | None = None,
    iteration: int | None = None,
    return_dtype: str | None = None,
    last: bool = False,
    x_stepd_request_id: RequestIdHeader = None,
) -> Response:
    """Body: safetensors of gradients keyed by parameter name (F32, BF16 or F16: each
    parameter comes back in its gradient's precision unless ``return_dtype`` names one);
    one fused launch per group.

    Sync groups: ``worker``, ``iteration`` and ``last`` as for one parameter; the metadata's
    ``dropped`` names the workers dropped from the iteration (absent if none).

    The reply is a safetensors of the updated parameters whose ``__metadata__`` holds
    ``versions``, ``skipped`` (non-finite gradients) and ``stale`` (JSON), or, with
    ``return_params=false``, that JSON alone. ``stale``: in async groups (the ``versions``
    metadata of the request) one gradient beyond ``max_staleness`` refuses the request's
    plain and async part as a whole; those names are listed, with their current values and
    versions.

    With ``X-Stepd-Request-Id``, a repeated id is not applied again (nor counted again in a
    sync round): the reply carries the versions and applied flags recorded for the first
    delivery and the parameters' current values — for a single client, exactly the first
    reply. An id reused for other parameters is a 409.
    """
    limit = request.app.state.engine.settings.max_body_bytes
    return (await step_many(Call.of(request), lambda: read_body(request, limit))).response()


@router.post(
    "/pull",
    responses={200: {"content": {SAFETENSORS: {}}, "description": "the current parameters"}},
    response_class=Response,
)
async def pull(run: str, body: PullRequest, request: Request) -> Response:
    """The current float32 value of each named parameter, as a safetensors whose
    ``__metadata__`` holds ``versions`` (JSON): each value with the version it is, read
    together. For workers that catch up without stepping (an async worker that lagged, one
    that joins late)."""
    engine: Engine = request.app.state.engine
    pulled = await run_in_threadpool(engine.pull, run, body.names)
    values = {n: value for n, (_, value) in zip(body.names, pulled, strict=True)}
    versions = {n: version for n, (version, _) in zip(body.names, pulled, strict=True)}
    payload = dump(values, {"versions": json.dumps(versions)})
    engine.metrics.bytes_out.inc(len(payload))
    return Response(payload, media_type=SAFETENSORS)
