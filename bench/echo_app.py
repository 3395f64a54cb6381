"""The anchor for the HTTP benchmark: a bare ASGI app that echoes the request body back,
served by the same uvicorn as stepd. Whatever stepd adds on top of this is the API's cost."""

from __future__ import annotations


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    chunks = []
    more = True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    body = b"".join(chunks)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/octet-stream")],
        }
    )
    await send({"type": "http.response.body", "body": body})
