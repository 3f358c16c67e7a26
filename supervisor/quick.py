"""The quick socket: `pmx list` and `pmx ping` without ZeroMQ on the client's side.

pyzmq's import alone costs the CLI about 30 ms, three times the interpreter's own start,
and `pmx list` is the command people run most and scripts run in loops. So pmxd also
answers the read-only commands LIST and PING on a plain Unix stream socket,
home/quick.sock: mode 0600 and the same uid check as the control socket (SO_PEERCRED),
one request per connection, the same JSON request and reply as on the control socket;
the client ends its request with shutdown(SHUT_WR), pmxd ends its reply by closing.
Anything else, and any failure here, goes through the control socket (cli/client.py),
which also says why when pmxd does not answer. asyncio's listener, unlike libzmq's,
pauses instead of aborting when pmxd is short of file descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from .errors import PmxError, ProtocolError
from .protocol import (
    MAX_MESSAGE_BYTES,
    Command,
    ErrorCode,
    JsonObject,
    Reply,
    Request,
    decode_request,
    encode_reply,
    error_reply,
)

log = logging.getLogger(__name__)

QUICK_COMMANDS = frozenset({Command.LIST, Command.PING})
REQUEST_TIMEOUT_S = 5.0  # a client that connects and sends nothing is dropped after this

Handler = Callable[[Request], Awaitable[JsonObject]]


class QuickServer:
    def __init__(self, path: Path, handlers: Mapping[Command, Handler]) -> None:
        self.path = path
        self._handlers = {command: handlers[command] for command in QUICK_COMMANDS}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen; a failure costs only the quick path (clients fall back), so it is logged."""
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
            os.chmod(self.path, 0o600)
        except OSError as exc:
            log.warning("no quick socket at %s (%s): pmx list goes through the control "
                        "socket", self.path, exc.strerror)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not _same_user(writer.get_extra_info("socket")):
                log.warning("refused a quick request from another user")
                return
            data = await asyncio.wait_for(_read_request(reader), REQUEST_TIMEOUT_S)
            writer.write(encode_reply(await self._reply(data)))
            await writer.drain()
        except (OSError, TimeoutError):
            pass  # the client went away or never asked: it falls back or has gone
        finally:
            writer.close()

    async def _reply(self, data: bytes) -> Reply:
        request_id = None
        try:
            request = decode_request(data)
            request_id = request.id
            handler = self._handlers.get(request.command)
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_COMMAND, "the quick socket answers only "
                                    "list and ping", request_id)
            return Reply(request.id, True, await handler(request))
        except ProtocolError as exc:
            return error_reply(exc.request_id, exc.code, str(exc))
        except PmxError as exc:
            return error_reply(request_id, ErrorCode.FAILED, str(exc))


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """Up to the client's end of sending; at most one byte over the limit (then refused)."""
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_MESSAGE_BYTES:
        chunk = await reader.read(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _same_user(sock: socket.socket | None) -> bool:
    if sock is None:
        return False
    try:
        credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _, uid, _ = struct.unpack("3i", credentials)
    return bool(uid == os.getuid())
