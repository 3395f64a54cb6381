"""/v1/step: many parameters in one request, safetensors in and out."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request, Response

from ..store import Invalid
from ..tensors import dump_safetensors, parse_safetensors
from .deps import MetricsDep, SettingsDep, StoreDep, read_body
from .params import SAFETENSORS, run_step

router = APIRouter(prefix="/v1", tags=["steps"])


@router.post(
    "/step",
    responses={200: {"content": {SAFETENSORS: {}}, "description": "updated parameters"}},
    response_class=Response,
)
async def step_batch(
    request: Request,
    store: StoreDep,
    metrics: MetricsDep,
    settings: SettingsDep,
    return_params: bool = True,
) -> Response:
    """Body: safetensors of gradients keyed by parameter name; one fused launch per group.

    The reply is a safetensors of the updated parameters whose ``__metadata__`` holds
    ``versions`` and ``skipped`` (JSON), or, with ``return_params=false``, that JSON alone.
    """
    start = time.perf_counter()
    body = await read_body(request, settings.max_body_bytes)
    grads, _ = parse_safetensors(body)
    if not grads:
        raise Invalid("the safetensors body holds no gradients")
    metrics.bytes_in.inc(len(body))

    outcomes = {o.name: o for o in await run_step(store, grads, return_params)}
    for o in outcomes.values():
        if o.applied:
            metrics.steps.labels(store.entry(o.name).group.id).inc()
        else:
            metrics.skipped.inc()
    meta = {
        "versions": {n: o.version for n, o in outcomes.items()},
        "skipped": [n for n, o in outcomes.items() if not o.applied],
    }
    if not return_params:
        metrics.step_seconds.observe(time.perf_counter() - start)
        return Response(json.dumps(meta), media_type="application/json")
    params = {n: o.param for n, o in outcomes.items()}
    payload = dump_safetensors(params, {k: json.dumps(v) for k, v in meta.items()})
    metrics.bytes_out.inc(len(payload))
    metrics.step_seconds.observe(time.perf_counter() - start)
    return Response(payload, media_type=SAFETENSORS)
