"""The FastAPI application factory. State lives in ``app.state``, built in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import ipaddress
import json
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from stepd.kernels.backends import get_backend

from stepd import __version__
from stepd.wire import PROTOCOL, WireError

from .api import checkpoints, dataplane, health, pages, params, runs, training
from .api.lean import ROUTE as STEP_ROUTE
from .api.lean import StepsApp
from .config import Settings, get_settings
from .engine import Engine
from .errors import StoreError, status_of

log = logging.getLogger("stepd")


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cpu" or "cuda"
    reason: str  # why, for the banner: what ``auto`` found, or that it was asked for
    fell_back: bool = False  # ``auto`` saw a GPU that failed its self-test


class DeviceError(RuntimeError):
    """``--device cuda`` where CUDA is not usable; the message says why, on one line."""


def choose_device(device: str) -> DeviceChoice:
    """The device to serve on. CUDA (asked for, or ``auto`` with a GPU present) must first
    prove itself: its kernels load, one launch and one CuPy elementwise op match the NumPy
    reference bit for bit. ``auto`` falls back to the CPU, saying why; ``cuda`` fails."""
    if device not in ("auto", "cuda"):
        return DeviceChoice(device, f"--device {device}")
    try:
        backend = get_backend("cuda")
    except Exception as exc:  # no CuPy, no driver or no device: the CPU it is
        if device == "cuda":
            raise DeviceError(f"--device cuda: no usable CUDA backend: {_line(exc)}") from exc
        return DeviceChoice("cpu", f"--device auto: no usable CUDA: {_line(exc)}")
    try:
        backend.warm_up()  # every kernel loaded now, not at a first step
        backend.self_test()
    except Exception as exc:  # a device that is there but misbehaves
        if device == "cuda":
            raise DeviceError(f"--device cuda: the CUDA self-test failed: {_line(exc)}") from exc
        reason = f"--device auto: the CUDA self-test failed: {_line(exc)}"
        return DeviceChoice("cpu", reason, fell_back=True)
    return DeviceChoice("cuda", f"--device {device}: kernels loaded, self-test passed")


def pick_device(device: str) -> str:
    """:func:`choose_device`'s device, its reason logged."""
    choice = choose_device(device)
    (log.warning if choice.fell_back else log.info)("device: %s (%s)", choice.device, choice.reason)
    return choice.device


def _line(exc: BaseException) -> str:
    """An exception as one line: its first (driver messages run on for pages)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's logging, with the ``stepd`` logger on its handler and format: otherwise its
    info lines (the banner) would reach no handler at all."""
    from uvicorn.config import LOG_LEVELS, LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["stepd"] = {
        "handlers": ["default"],
        "level": LOG_LEVELS[level],
        "propagate": False,
    }
    return config


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def banner(settings: Settings, engine: Engine, choice: DeviceChoice) -> list[str]:
    """What this server is and where it listens, a line each (logged at start-up)."""
    budget = engine.budget / (1 << 30)
    if settings.memory_budget is not None:
        source = "STEPD_MEMORY_BUDGET"
    elif engine.device == "cuda":
        source = "default: 80% of the GPU's memory"
    else:
        source = "default: half the host's memory"
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    shm = f"shm://{settings.shm_socket}" if settings.shm_socket else "off (--shm-socket PATH)"
    shard = f"{settings.shard_index} of {settings.shard_count}"
    access = "on" if settings.access_log else "off (--access-log)"
    return [
        f"stepd {__version__} (wire protocol {PROTOCOL})",
        f"  device       {engine.device}, kernel backend {engine.backend_name} ({choice.reason})",
        f"  http         http://{host}:{settings.port} (dashboard at /, API at /docs)",
        f"  shm          {shm}",
        f"  checkpoints  {Path(settings.checkpoint_dir).absolute()}",
        f"  memory       budget {budget:.1f} GiB ({source})",
        f"  token        {'on' if settings.token else 'off'}",
        f"  shard        {shard}",
        f"  access log   {access}",
    ]


class StepdApp:
    """The served ASGI app, the front door of every request.

    It checks the bearer token (every path but ``/healthz`` and the dashboard's page and
    static files, which hold no data) before anything reads the body,
    and caps every body at ``max_body_bytes`` (413) — JSON included, which FastAPI would
    otherwise read whole. Then the two step endpoints go straight to a bare ASGI app (no
    framework layer: :mod:`.api.lean`) and
    the rest to FastAPI: FastAPI's own per-request layers cost ~0.25 ms here even for a plain
    route — as much as a whole tiny step. Both apps share one ``state`` and the same exception
    handlers; FastAPI runs the lifespan and the docs."""

    def __init__(self, api: FastAPI, fast: StepsApp) -> None:
        self.api, self.fast = api, fast
        fast.state = api.state

    @property
    def state(self) -> Any:
        return self.api.state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.api(scope, receive, send)  # the lifespan
            return
        settings = self.api.state.settings
        headers = dict(scope["headers"])
        path = scope["path"]
        if settings.token and path != "/healthz" and not pages.is_public(path):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {settings.token}".encode()):
                await _reply(send, 401, "missing or wrong bearer token", WWW_AUTHENTICATE)
                return
        limit = settings.max_body_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _reply(send, 413, f"body of {int(declared)} bytes exceeds the limit of {limit}")
            return
        receive = _capped(receive, limit)
        app = (
            self.fast
            if scope["method"] == "POST" and STEP_ROUTE.fullmatch(scope["path"])
            else self.api
        )
        try:
            await app(scope, receive, send)
        except Exception:
            # The app answered it already (a JSON 500: _internal) and re-raises so that the
            # server logs it; uvicorn would then close the keep-alive connection, and a pooled
            # client's next request on it would meet a reset. Logged here instead; a reply
            # left unstarted or unfinished is still uvicorn's to answer or cut.
            log.exception("unexpected error in %s %s", scope["method"], scope["path"])


WWW_AUTHENTICATE = [(b"www-authenticate", b"Bearer")]


async def _reply(send: Any, status: int, detail: str, extra: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
    )
    await send({"type": "http.response.body", "body": body})


def _capped(receive: Any, limit: int) -> Any:
    """``receive`` that raises 413 once a body streamed without Content-Length passes
    ``limit`` (the HTTPException reaches the apps' handlers like any other)."""
    seen = 0

    async def capped() -> dict:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"body exceeds the limit of {limit} bytes")
        return message

    return capped


def create_app(settings: Settings | None = None, device: DeviceChoice | None = None) -> StepdApp:
    """The app; ``device`` is the choice ``stepd serve`` made before starting (so that a bad
    ``--device cuda`` is a one-line error, not a failed lifespan), else made at start-up."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        choice = device or choose_device(settings.device)
        engine = Engine(settings, choice.device)
        for line in banner(settings, engine, choice):
            log.info("%s", line)
        if choice.fell_back:
            log.warning("%s", choice.reason)
        if not settings.token and not _loopback(settings.host):
            log.warning(
                "listening on %s without a token: anyone who reaches the port can read and "
                "change every run (set STEPD_TOKEN)",
                settings.host,
            )
        removed = engine.clean_temporaries()
        if removed:
            log.warning("removed %d leftovers of interrupted checkpoint saves", len(removed))
        app.state.settings = settings
        app.state.engine = engine
        shm = None
        if settings.shm_socket is not None:
            from .shm import ShmServer

            shm = ShmServer(engine, settings.shm_socket, settings.shm_max_connections)
            shm.start()
        app.state.shm = shm
        reaper = asyncio.create_task(_reap(engine, settings.anonymous_run_ttl))
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            if shm is not None:
                shm.stop()
        if settings.checkpoint_on_shutdown:
            for info in await run_in_threadpool(engine.save_all):
                log.info("final checkpoint %s written", info.name)

    app = FastAPI(
        title="stepd",
        version=__version__,
        summary="An optimizer-step service: runs of named parameters and their optimizer state",
        lifespan=lifespan,
        docs_url=None,  # served by pages, with their scripts from the package, not a CDN
        redoc_url=None,
    )
    app.include_router(health.router)
    pages.mount(app)
    # The token is checked once, in StepdApp, before any route (or body parsing) runs.
    for module in (runs, params, dataplane, training, checkpoints):
        app.include_router(module.router)
    app.include_router(health.metrics_router)
    handlers: dict[Any, Any] = {
        StoreError: _handle,
        WireError: _handle,
        RequestValidationError: _invalid_request,
        Exception: _internal,  # anything else: a JSON 500 (StepdApp logs it)
    }
    for exc_type, handler in handlers.items():
        app.add_exception_handler(exc_type, handler)
    handlers[HTTPException] = http_exception_handler
    return StepdApp(app, StepsApp(handlers))


async def _reap(engine: Engine, ttl: float) -> None:
    """Delete anonymous runs whose client vanished, checking a few times per TTL."""
    while True:
        await asyncio.sleep(min(max(ttl / 4, 0.05), 60.0))
        for name in await run_in_threadpool(engine.reap):
            log.info("anonymous run %s reaped after %.0f s idle", name, ttl)


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, whose ``input`` echoes may hold NaN or Infinity, which JSON cannot
    carry (the default handler then failed with a 500): those go back as strings."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _finite(jsonable_encoder(exc.errors()))}, status_code=422)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    """An error no rule maps to a status: the server's fault. Its type only (the message
    may hold paths of the server's disk); the traceback is in the server's log."""
    return JSONResponse(
        {"detail": f"internal error ({type(exc).__name__}); see the server's log"},
        status_code=500,
    )


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=int(status_of(exc)))
