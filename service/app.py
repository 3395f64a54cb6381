"""The FastAPI application factory. State lives in ``app.state``, built in the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from kernels.backends import get_backend

from .api import checkpoints, dataplane, health, params, training
from .api.deps import require_token
from .checkpoints import CheckpointDir
from .config import Settings, get_settings
from .metrics import Metrics
from .store import Conflict, Invalid, NotFound, ParamStore
from .tensors import BadTensor

log = logging.getLogger("stepd")


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        get_backend("cuda")
        return "cuda"
    except Exception:  # no CuPy, no driver or no device: the CPU it is
        return "cpu"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = ParamStore(pick_device(settings.device), settings.nonfinite)
        ckpts = CheckpointDir(settings.checkpoint_dir)
        removed = ckpts.clean_temporaries()
        if removed:
            log.warning("removed %d leftovers of interrupted checkpoint saves", len(removed))
        app.state.settings = settings
        app.state.store = store
        app.state.checkpoints = ckpts
        app.state.metrics = Metrics(store.device_bytes)
        yield
        if settings.checkpoint_on_shutdown and store.names():
            info = await run_in_threadpool(
                checkpoints.save_checkpoint, store, ckpts, app.state.metrics, None
            )
            log.info("final checkpoint %s written", info.name)

    app = FastAPI(
        title="stepd",
        version="0.1.0",
        summary="An optimizer-step service: named parameters and their optimizer state",
        lifespan=lifespan,
    )
    app.include_router(health.router)
    protected = [Depends(require_token)]
    for module in (params, dataplane, training, checkpoints):
        app.include_router(module.router, dependencies=protected)
    app.include_router(health.metrics_router, dependencies=protected)
    app.router.routes[:0] = dataplane.FAST_ROUTES  # served first; see api/dataplane.py

    for exc_type, status in ((NotFound, 404), (Conflict, 409), (Invalid, 422), (BadTensor, 422)):
        app.add_exception_handler(exc_type, _handler(status))
    return app


def _handler(status: int) -> Any:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status)

    return handle
