"""pmx web's HTTP side (aiohttp): the dashboard's files, the JSON API, /metrics, the live
stream, the token check, and `serve`, which runs it all until SIGTERM or SIGINT.

Every route needs `Authorization: Bearer TOKEN` (401 without, 403 with a wrong one)
except the page and its static files, which carry no data, and /metrics, as Prometheus
scrapers expect. Actions are POST, and since a cross-site form or
image cannot set that header, they cannot be triggered from another site; no response
carries a CORS allowance. Requests to pmxd are blocking ZeroMQ calls: they run in a
thread pool, never on the event loop. The live view comes from one Feed (feed.py)
through the Hub (hub.py), whatever the number of browsers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from pmx.cli.client import Client
from pmx.supervisor.errors import CommandError, DaemonUnreachable, PmxError
from pmx.supervisor.protocol import Command, Json, JsonObject

from .feed import Batch, Feed
from .hub import Hub
from .metrics import CONTENT_TYPE, exposition, read_figures
from .token import token_matches

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
KEEPALIVE_S = 15.0
# action -> (command, how long pmxd may take); the same limits as the CLI's.
ACTIONS: dict[str, tuple[Command, float]] = {
    "restart": (Command.RESTART, 120), "reload": (Command.RELOAD, 600),
    "stop": (Command.STOP, 120), "start": (Command.START, 60), "scale": (Command.SCALE, 120)}
HTTP_STATUS = {"bad_args": 400, "not_found": 404, "busy": 409, "too_large": 413}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


@dataclass(slots=True)
class WebState:
    """What the handlers share: the token, pmxd's client, the calls' threads, the hub."""

    token: str
    client: Client
    calls: ThreadPoolExecutor
    hub: Hub
    feed: Feed | None = None

    async def call(self, command: Command, args: JsonObject | None = None,
                   timeout_s: float = 5.0) -> JsonObject:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.calls, functools.partial(self.client.call, command, args, timeout_s=timeout_s))


STATE = web.AppKey("state", WebState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def pmx_error(exc: PmxError) -> web.Response:
    """pmxd's refusal or absence as an HTTP answer."""
    if isinstance(exc, DaemonUnreachable):
        return error(503, "unreachable", str(exc))
    code = exc.code if isinstance(exc, CommandError) else "failed"
    return error(HTTP_STATUS.get(code, 500), code, str(exc))


def is_public(path: str) -> bool:
    """What needs no token: the page and its files (they hold no data), and /metrics.
    Everything else does, including paths no route serves (default deny)."""
    return path in ("/", "/metrics") or path.startswith("/static/")


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The token, on every route that is not public."""
    if not is_public(request.path):
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if not given:
            response = error(401, "unauthorized", "this needs the header Authorization: "
                                                  "Bearer TOKEN (pmx web --show-token prints it)")
            response.headers["WWW-Authenticate"] = 'Bearer realm="pmx"'
            return response
        if scheme.lower() != "bearer" or not token_matches(request.app[STATE].token, token.strip()):
            return error(403, "forbidden", "wrong token")
    return await handler(request)


async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer, errors and static files included: no framing, no sniffing, no
    referrer, no caching; and no CORS header, ever."""
    response.headers.update(PAGE_HEADERS)
    # Static files revalidate (Last-Modified), so an upgraded pmx serves its new page.
    static = request.path.startswith("/static/")
    response.headers["Cache-Control"] = "no-cache" if static else "no-store"


# ---------------------------------------------------------------- pages and reads


async def index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html")


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    loop = asyncio.get_running_loop()
    counters = {app: dict(counts) for app, counts in state.hub.counters.items()}
    figures = await loop.run_in_executor(state.calls, read_figures, state.client, counters)
    response = web.Response(body=exposition(figures))
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


async def api_state(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].hub.snapshot())


async def api_list(request: web.Request) -> web.Response:
    try:
        result = await request.app[STATE].call(Command.LIST)
    except PmxError as exc:
        return pmx_error(exc)
    return web.json_response(result.get("instances"))


async def api_describe(request: web.Request) -> web.Response:
    target = request.match_info.get("target", "all")
    try:  # show_secrets is never asked: env values that look secret stay masked
        result = await request.app[STATE].call(Command.DESCRIBE, {"target": target})
    except PmxError as exc:
        return pmx_error(exc)
    return web.json_response(result.get("apps"))


async def api_daemon(request: web.Request) -> web.Response:
    try:
        result = await request.app[STATE].call(Command.PING, timeout_s=2.0)
    except PmxError as exc:
        return pmx_error(exc)
    return web.json_response(result)


async def api_events(request: web.Request) -> web.Response:
    return web.json_response(list(request.app[STATE].hub.events))


async def api_logs(request: web.Request) -> web.Response:
    app = request.match_info["app"]
    lines = request.app[STATE].hub.logs.get(app)
    if lines is None and app not in {a.get("name") for a in request.app[STATE].hub.apps}:
        return error(404, "not_found", f'no app "{app}"')
    return web.json_response(list(lines or []))


async def api_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: `hello` (the whole model), then every change."""
    hub = request.app[STATE].hub
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    subscriber = hub.subscribe()
    try:
        while True:
            try:
                message = await asyncio.wait_for(subscriber.queue.get(), KEEPALIVE_S)
            except TimeoutError:
                message = b": keep-alive\n\n"  # also how a closed browser is noticed
            if message is None:
                break
            await response.write(message)
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        hub.unsubscribe(subscriber)
    return response


# ---------------------------------------------------------------- actions


async def api_action(request: web.Request) -> web.Response:
    """POST /api/apps/{target}/{action}: pmxd's reply, per target, as the CLI gets it."""
    target, action = request.match_info["target"], request.match_info["action"]
    if action not in ACTIONS:
        return error(404, "not_found", f"no action {action!r}; one of {', '.join(ACTIONS)}")
    command, timeout_s = ACTIONS[action]
    args: JsonObject = {"target": target}
    if action == "scale":
        body: Json = None
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                return error(400, "bad_args", "the body must be JSON: {\"count\": \"+1\"}")
        count = str(body.get("count")) if isinstance(body, dict) else ""
        if not re.fullmatch(r"[+-]?[0-9]+", count):
            return error(400, "bad_args", f'count must be a number like 6, +2 or -1, got "{count}"')
        args["count"] = count
    state = request.app[STATE]
    try:
        result = await state.call(command, args, timeout_s=timeout_s)
    except PmxError as exc:
        return pmx_error(exc)
    finally:
        if state.feed is not None:
            state.feed.poke()  # the app's `busy` ended without an event: show it now
    return web.json_response(result)


# ---------------------------------------------------------------- the application


def make_app(home: Path, token: str) -> web.Application:
    """The aiohttp application; its feed starts and stops with it."""
    client = Client(home)
    _ = client.context  # made once here: the calls' threads share it (contexts are thread-safe)
    state = WebState(token, client, ThreadPoolExecutor(8, thread_name_prefix="pmx-web-call"), Hub())
    app = web.Application(middlewares=[guard], client_max_size=64 * 1024)
    app[STATE] = state
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/state", api_state)
    app.router.add_get("/api/stream", api_stream)
    app.router.add_get("/api/list", api_list)
    app.router.add_get("/api/apps", api_describe)
    app.router.add_get("/api/apps/{target}", api_describe)
    app.router.add_get("/api/daemon", api_daemon)
    app.router.add_get("/api/events", api_events)
    app.router.add_get("/api/logs/{app}", api_logs)
    app.router.add_post("/api/apps/{target}/{action}", api_action)
    app.cleanup_ctx.append(_run_feed)
    app.on_shutdown.append(_end_streams)
    app.on_response_prepare.append(add_headers)
    return app


async def _run_feed(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    loop = asyncio.get_running_loop()

    def deliver(batch: Batch) -> None:  # on the feed's thread
        try:
            loop.call_soon_threadsafe(state.hub.apply, batch)
        except RuntimeError:
            pass  # the loop is closed: shutting down

    feed = state.feed = Feed(state.client.home, deliver)
    feed.start()
    yield
    await loop.run_in_executor(None, feed.stop)
    state.calls.shutdown(wait=False, cancel_futures=True)
    state.client.close()


async def _end_streams(app: web.Application) -> None:
    app[STATE].hub.close()


async def serve(home: Path, token: str, host: str, port: int,
                ready: Callable[[str], None]) -> None:
    """Serve until SIGTERM or SIGINT. `ready` is told the address once it listens.
    Raises PmxError when the address cannot be bound."""
    runner = web.AppRunner(make_app(home, token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, shutdown_timeout=3.0)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        # asyncio words it "error while attempting to bind on address ...": say it once.
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise PmxError(f"cannot listen on {_address(host, port)} for pmx web: "
                       f"{why[:1].lower()}{why[1:]}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    ready(_address(host, port))
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
