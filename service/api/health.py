"""/healthz (always open) and /metrics (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .deps import ERRORS, EngineDep

router = APIRouter(tags=["health"])
# behind the token, unlike /healthz
metrics_router = APIRouter(tags=["health"], responses={401: ERRORS[401]})


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@metrics_router.get("/metrics", response_class=Response)
def metrics(engine: EngineDep) -> Response:
    return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)
