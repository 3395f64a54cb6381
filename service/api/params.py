"""/v1/runs/{run}/params: register, lr_scale, Hessian input, value and inspection."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from stepd.kernels import l2_norm

from stepd.wire import OCTET, SAFETENSORS, SHAPE_HEADER, dump, from_bytes

from ..errors import Invalid
from ..schemas import (
    LrScale,
    ParamHistory,
    ParamInfo,
    ParamStats,
    RegisterRequest,
    TensorStats,
)
from .deps import ERRORS, EngineDep, read_body

router = APIRouter(prefix="/v1/runs/{run}/params", tags=["params"], responses=ERRORS)
Format = Annotated[Literal["raw", "safetensors"], Query(description="raw bytes or safetensors")]


def tensor_response(name: str, arr: np.ndarray, fmt: str) -> Response:
    if fmt == "safetensors":
        return Response(dump({name: arr}), media_type=SAFETENSORS)
    shape = ",".join(map(str, arr.shape))
    return Response(arr.tobytes(), media_type=OCTET, headers={SHAPE_HEADER: shape})


@router.post("", status_code=201, response_model=ParamInfo)
async def register(
    run: str, body: RegisterRequest, engine: EngineDep, response: Response
) -> ParamInfo:
    """Register a parameter. The same config again is idempotent (200); another is a 409."""
    value = None
    if body.value is not None:
        try:
            raw = base64.b64decode(body.value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Invalid(f"{body.name!r}: value is not valid base64: {exc}") from None
        value = from_bytes(raw, tuple(body.shape), f"{body.name!r} value")
    entry, created = await run_in_threadpool(
        engine.register,
        run,
        body.name,
        body.shape,
        value,
        body.group.algorithm,
        body.group.hyperparams,
        body.lr_scale,
        body.group.workers.model_dump(exclude_none=True) if body.group.workers else None,
        (body.shard.index, body.shard.count) if body.shard else None,
    )
    if not created:
        response.status_code = 200
    return ParamInfo(**engine.param(run, entry.name))


@router.get("", response_model=list[ParamInfo])
async def list_params(run: str, engine: EngineDep) -> list[ParamInfo]:
    return [ParamInfo(**p) for p in engine.params(run)]


@router.get("/{name}", response_model=ParamInfo)
async def get_param(run: str, name: str, engine: EngineDep) -> ParamInfo:
    return ParamInfo(**engine.param(run, name))


@router.put("/{name}/value", response_model=ParamInfo)
async def set_value(run: str, name: str, request: Request, engine: EngineDep) -> ParamInfo:
    """Overwrite the parameter with raw float32 bytes (its state is kept)."""
    entry = engine.entry(run, name)
    body = await read_body(request, engine.settings.max_body_bytes)
    value = from_bytes(body, entry.shape, f"{name!r} value")
    await run_in_threadpool(engine.set_value, run, name, value)
    return ParamInfo(**engine.param(run, name))


@router.get("/{name}/value", response_class=Response)
async def get_value(run: str, name: str, engine: EngineDep, format: Format = "raw") -> Response:
    return tensor_response(name, await run_in_threadpool(engine.read, run, name), format)


@router.get("/{name}/state/{slot}", response_class=Response)
async def get_slot(
    run: str, name: str, slot: str, engine: EngineDep, format: Format = "raw"
) -> Response:
    arr = await run_in_threadpool(engine.read_slot, run, name, slot)
    return tensor_response(f"{name}/{slot}", arr, format)


@router.post("/{name}/hessian", status_code=204, response_class=Response)
async def hessian(run: str, name: str, request: Request, engine: EngineDep) -> Response:
    """A Hessian-diagonal estimate for curvature-aware algorithms (Sophia), as raw float32."""
    entry = engine.entry(run, name)
    body = await read_body(request, engine.settings.max_body_bytes)
    h = from_bytes(body, entry.shape, f"{name!r} Hessian")
    await run_in_threadpool(engine.update_hessian, run, name, h)
    return Response(status_code=204)


@router.get("/{name}/lr_scale", response_model=LrScale)
async def get_lr_scale(run: str, name: str, engine: EngineDep) -> LrScale:
    return LrScale(lr_scale=engine.lr_scale(run, name))


@router.put("/{name}/lr_scale", response_model=LrScale)
def set_lr_scale(run: str, name: str, body: LrScale, engine: EngineDep) -> LrScale:
    return LrScale(lr_scale=engine.set_lr_scale(run, name, body.lr_scale))


def tensor_stats(x: np.ndarray) -> TensorStats:
    x = x.reshape(-1)
    finite = x[np.isfinite(x)]
    n = x.size
    return TensorStats(
        l2_norm=l2_norm(x),
        min=float(finite.min()) if finite.size else None,
        max=float(finite.max()) if finite.size else None,
        mean=float(finite.astype(np.float64).mean()) if finite.size else None,
        nonfinite_fraction=(n - finite.size) / n if n else 0.0,
    )


@router.get("/{name}/stats", response_model=ParamStats)
async def stats(run: str, name: str, engine: EngineDep) -> ParamStats:
    """Per-slot statistics (finite entries; non-finite counted apart) and the last norms."""

    def collect() -> ParamStats:
        param, slots, counters = engine.inspect(run, name)
        return ParamStats(
            name=name,
            param=tensor_stats(param),
            slots={k: tensor_stats(v) for k, v in slots.items()},
            **counters,
        )

    return await run_in_threadpool(collect)


@router.get("/{name}/history", response_model=ParamHistory)
async def history(run: str, name: str, engine: EngineDep, after: int | None = None) -> ParamHistory:
    """The parameter's last measurements (norms, update/param ratio, lr), oldest first; with
    ``after``, only those taken at a later version."""
    return ParamHistory(**engine.param_history(run, name, after))
