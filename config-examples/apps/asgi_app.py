"""A minimal ASGI app for the uvicorn example (config-examples/uvicorn.toml)."""

import os
from collections.abc import Awaitable, Callable


async def app(scope: dict[str, object], receive: Callable[[], Awaitable[dict[str, object]]],
              send: Callable[[dict[str, object]], Awaitable[None]]) -> None:
    if scope["type"] != "http":
        return
    body = f"hello from uvicorn pid {os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
