"""/v1/params: register, step one parameter, lr_scale, Hessian input, inspection."""

from __future__ import annotations

import base64
import binascii
import math
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from ..schemas import LrScale, ParamInfo, ParamStats, RegisterRequest, TensorStats
from ..store import Entry, Invalid, ParamStore
from ..tensors import dump_safetensors, from_bytes
from .deps import ERRORS, SettingsDep, StoreDep, read_body

router = APIRouter(prefix="/v1/params", tags=["params"], responses=ERRORS)
OCTET = "application/octet-stream"
SAFETENSORS = "application/x-safetensors"
Format = Annotated[Literal["raw", "safetensors"], Query(description="raw bytes or safetensors")]


def info(store: ParamStore, e: Entry) -> ParamInfo:
    return ParamInfo(
        name=e.name,
        shape=list(e.shape),
        group=e.group.id,
        algorithm=e.group.algorithm,
        version=e.version,
        lr_scale=store.lr_scale(e.name),
        state_bytes=store.state_bytes(e.name),
    )


def tensor_response(name: str, arr: np.ndarray, fmt: str) -> Response:
    if fmt == "safetensors":
        return Response(dump_safetensors({name: arr}), media_type=SAFETENSORS)
    return Response(arr.tobytes(), media_type=OCTET, headers={"X-Stepd-Shape": _shape(arr)})


def _shape(arr: np.ndarray) -> str:
    return ",".join(map(str, arr.shape))


@router.post("", status_code=201, response_model=ParamInfo)
async def register(
    body: RegisterRequest, store: StoreDep, settings: SettingsDep, response: Response
) -> ParamInfo:
    """Register a parameter. The same config again is idempotent (200); another is a 409."""
    if math.prod(body.shape) * 4 > settings.max_body_bytes:  # before allocating its zeros
        raise Invalid(
            f"{body.name!r}: shape {body.shape} needs more than the body limit of "
            f"{settings.max_body_bytes} bytes per gradient"
        )
    value = None
    if body.value is not None:
        try:
            raw = base64.b64decode(body.value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise Invalid(f"{body.name!r}: value is not valid base64: {exc}") from None
        value = from_bytes(raw, tuple(body.shape), f"{body.name!r} value")
    entry, created = await run_in_threadpool(
        store.register,
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
    return info(store, entry)


@router.get("", response_model=list[ParamInfo])
async def list_params(store: StoreDep) -> list[ParamInfo]:
    return [info(store, e) for e in store.iter_entries()]


@router.get("/{name}", response_model=ParamInfo)
async def get_param(name: str, store: StoreDep) -> ParamInfo:
    return info(store, store.entry(name))


@router.put("/{name}/value", response_model=ParamInfo)
async def set_value(
    name: str, request: Request, store: StoreDep, settings: SettingsDep
) -> ParamInfo:
    """Overwrite the parameter with raw float32 bytes (its state is kept)."""
    entry = store.entry(name)
    body = await read_body(request, settings.max_body_bytes)
    value = from_bytes(body, entry.shape, f"{name!r} value")
    await run_in_threadpool(store.set_value, name, value)
    return info(store, entry)


@router.get("/{name}/value", response_class=Response)
async def get_value(name: str, store: StoreDep, format: Format = "raw") -> Response:
    return tensor_response(name, await run_in_threadpool(store.read, name), format)


@router.get("/{name}/state/{slot}", response_class=Response)
async def get_slot(name: str, slot: str, store: StoreDep, format: Format = "raw") -> Response:
    arr = await run_in_threadpool(store.read_slot, name, slot)
    return tensor_response(f"{name}/{slot}", arr, format)


@router.post("/{name}/hessian", status_code=204, response_class=Response)
async def hessian(name: str, request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    """A Hessian-diagonal estimate for curvature-aware algorithms (Sophia), as raw float32."""
    entry = store.entry(name)
    body = await read_body(request, settings.max_body_bytes)
    h = from_bytes(body, entry.shape, f"{name!r} Hessian")
    await run_in_threadpool(store.update_hessian, name, h)
    return Response(status_code=204)


@router.get("/{name}/lr_scale", response_model=LrScale)
async def get_lr_scale(name: str, store: StoreDep) -> LrScale:
    return LrScale(lr_scale=store.lr_scale(name))


@router.put("/{name}/lr_scale", response_model=LrScale)
def set_lr_scale(name: str, body: LrScale, store: StoreDep) -> LrScale:
    store.set_lr_scale(name, body.lr_scale)
    return LrScale(lr_scale=store.lr_scale(name))


def tensor_stats(x: np.ndarray) -> TensorStats:
    from stepd.kernels import l2_norm

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
async def stats(name: str, store: StoreDep) -> ParamStats:
    """Per-slot statistics (finite entries; non-finite counted apart) and the last norms."""

    def collect() -> ParamStats:
        param, slots, counters = store.inspect(name)
        return ParamStats(
            name=name,
            param=tensor_stats(param),
            slots={k: tensor_stats(v) for k, v in slots.items()},
            **counters,
        )

    return await run_in_threadpool(collect)
