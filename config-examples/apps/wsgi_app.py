"""A minimal WSGI app for the gunicorn example (config-examples/gunicorn.toml)."""

import os
from collections.abc import Callable, Iterable


def app(environ: dict[str, object], start_response: Callable[..., object]) -> Iterable[bytes]:
    body = f"hello from gunicorn pid {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
