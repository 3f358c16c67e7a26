"""aiohttp's web.run_app hello: answers "hello <pid>".

HOST is a comma-separated list of addresses (run_app accepts several); unset means aiohttp's
default, every interface over IPv4 and IPv6 (one socket each).
"""

import os

from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=f"hello {os.getpid()}\n")


app = web.Application()
app.add_routes([web.get("/", hello)])

if __name__ == "__main__":
    hosts = os.environ["HOST"].split(",") if os.environ.get("HOST") else None
    web.run_app(app, host=hosts, port=int(os.environ.get("PORT", 8080)), print=None)
