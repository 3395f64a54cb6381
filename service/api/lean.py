"""The step endpoints as a bare ASGI app: nothing between uvicorn and :mod:`.dataplane`.

Every training step comes through here, so no framework layer runs per request: the route is
one regular expression, the query and the headers are read once into plain dicts (with
Starlette's rules: the last of a repeated query parameter, the first of a repeated header),
the body is received into a buffer of its declared length as its pieces arrive (a 64 MiB
gradient is not joined at the end), and the reply is two ``send`` calls with the headers
Starlette's ``Response`` would write. A large parameter goes out in slices of its own
array: uvicorn's flow control then paces the copies into the socket, instead of one copy of
the whole parameter into a bytes object before the first byte leaves.

Errors take the same path as in the apps (the same handlers, looked up the same way): a
mapped error is its JSON reply; anything else is a 500 by the catch-all handler, re-raised so
that :class:`stepd.service.app.StepdApp` logs it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import numpy as np
from fastapi import HTTPException
from starlette.datastructures import State
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .dataplane import Call, Reply, step_many, step_one

Handler = Callable[[Request, Exception], Awaitable[Response]]
ROUTE = re.compile(r"^/v1/runs/(?P<run>[^/]+)/(?:step|params/(?P<name>[^/]+)/step)$")
# A large array of a reply goes in slices of this size, each copied once on its way into the
# socket, where one send of the whole would be copied twice (into bytes, then the rest into
# the transport's buffer); parts below SMALL_PART are joined into one send.
SEND_SLICE = 4 << 20
SMALL_PART = 64 << 10


class StepsApp:
    """``POST /v1/runs/{run}/step`` and ``POST /v1/runs/{run}/params/{name}/step``."""

    def __init__(self, handlers: Mapping[Any, Handler]) -> None:
        self.handlers = handlers
        self.state = State()  # StepdApp shares the API's

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            match = ROUTE.fullmatch(scope["path"])
            if match is None:
                raise HTTPException(404, "Not Found")
            qs = scope["query_string"]
            call = Call(
                self.state.engine,
                match["run"],
                match["name"],
                dict(parse_qsl(qs.decode("latin-1"), keep_blank_values=True)) if qs else {},
                {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(scope["headers"])},
            )
            limit = call.engine.settings.max_body_bytes
            read = partial(receive_body, receive, call.headers.get("content-length"), limit)
            reply = await (step_one if call.name is not None else step_many)(call, read)
        except Exception as exc:
            handler, mapped = self._handler(exc)
            response = await handler(Request(scope, receive), exc)
            await response(scope, receive, send)
            if not mapped:
                raise  # a 500 was sent; StepdApp logs it
            return
        # Not under the handlers: once the reply has begun there is no other to send, and a
        # failure here (the client gone) goes up as it would from a Response.
        await send_reply(reply, send)

    def _handler(self, exc: Exception) -> tuple[Handler, bool]:
        """The handler of ``exc``'s nearest class, and whether it is a mapped error (not the
        catch-all 500)."""
        for cls in type(exc).__mro__:
            if cls is not Exception and cls in self.handlers:
                return self.handlers[cls], True
        return self.handlers[Exception], False


async def receive_body(receive: Any, declared: str | None, limit: int) -> bytes | memoryview:
    """The request body. One piece is used as it came; several are copied, as they arrive,
    into one buffer of the declared length (the bytes are never joined at the end). 413
    past ``limit``."""
    first = await _piece(receive)
    body, more = first
    if not more:
        return body
    size = int(declared) if declared is not None and declared.isdigit() else -1
    if size > limit:
        raise HTTPException(413, f"body of {size} bytes exceeds the limit of {limit}")
    if size < len(body):  # no usable length: gather the pieces
        chunks = [body]
        total = len(body)
        while more:
            body, more = await _piece(receive)
            total += len(body)
            if total > limit:
                raise HTTPException(413, f"body exceeds the limit of {limit} bytes")
            chunks.append(body)
        return b"".join(chunks)
    buf = np.empty(size, np.uint8)
    done = 0
    while True:
        n = len(body)
        if done + n > size:  # longer than declared: the server's HTTP layer prevents it
            raise HTTPException(400, f"body longer than its Content-Length of {size}")
        buf[done : done + n] = np.frombuffer(body, np.uint8)
        done += n
        if not more:
            break
        body, more = await _piece(receive)
    # read-only, as the bytes of a single piece would be: nothing may write into a gradient
    return buf.data[:done].toreadonly()


async def _piece(receive: Any) -> tuple[bytes, bool]:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnect()
    return message.get("body", b""), message.get("more_body", False)


async def send_reply(reply: Reply, send: Any) -> None:
    """The reply as Starlette's ``Response`` would write it (the same headers, in the same
    order), large arrays in slices of their own memory."""
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
    parts = reply.parts()
    if not (reply.status < 200 or reply.status in (204, 304)):
        length = sum(len(part) for part in parts)
        headers.append((b"content-length", str(length).encode("latin-1")))
    if reply.media_type is not None:
        headers.append((b"content-type", reply.media_type.encode("latin-1")))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    pieces = list(_pieces(parts))
    for k, piece in enumerate(pieces):
        last = k == len(pieces) - 1
        await send({"type": "http.response.body", "body": piece, "more_body": not last})


def _pieces(parts: list[bytes | memoryview]) -> Iterator[bytes | memoryview]:
    """The parts as the body's pieces: runs of small ones joined into one (one write for
    many small tensors), a large one in slices of at most SEND_SLICE of its own memory;
    always at least one piece."""
    pending: list[bytes | memoryview] = []
    held = 0
    for part in parts:
        if len(part) < SMALL_PART and len(part) <= SEND_SLICE:
            pending.append(part)
            held += len(part)
            if held >= SEND_SLICE:
                yield b"".join(pending)
                pending, held = [], 0
            continue
        if pending:
            yield b"".join(pending)
            pending, held = [], 0
        for start in range(0, len(part), SEND_SLICE):
            yield part[start : start + SEND_SLICE]
    if pending or not parts:
        yield b"".join(pending)
