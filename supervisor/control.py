"""The ZeroMQ control server: a ROUTER for requests and a PUB for events, stats and logs.

The PUB is an XPUB: it also tells pmxd every subscription and unsubscription (a
subscriber's end included), so `wants(topic)` knows whether anyone would receive a topic,
and what nobody follows (log lines, stats) is never built or encoded.

Every request gets exactly one reply carrying its id. Requests are handled each in a
task of its own, so a slow `stop` never freezes `list`. Commands are dispatched through
an explicit table given by the daemon, never by looking a name from the wire up as an
attribute. Damage of any kind (too large, not JSON, wrong version, unknown command,
wrong argument types) gets an error reply; a bug in a handler gets an `internal` reply
and a traceback in the daemon's log, never on the wire.

A burst of clients: libzmq aborts the process when accepting a connection fails with
EMFILE, so clients take a slot (home.py, `client_slots`) before they connect and spawns
leave fds free for every slot.

Access: the sockets live in the 0700 home and are 0600 themselves; libzmq's
IPC_FILTER_UID drops connections from other uids, and each request's sender uid (from
the kernel, via the Peer-Address property) is checked again before dispatch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import zmq
import zmq.asyncio

from .errors import CommandError, PmxError, ProtocolError
from .home import QUICK_SOCKET, prepare_client_slots
from .protocol import (
    MAX_MESSAGE_BYTES,
    PUBLISH_HWM,
    Command,
    ErrorCode,
    JsonObject,
    Reply,
    Request,
    decode_request,
    encode_log_block,
    encode_publication,
    encode_reply,
    error_reply,
)
from .quick import QuickServer

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[JsonObject]]


class ControlServer:
    def __init__(self, home: Path, handlers: Mapping[Command, Handler]) -> None:
        self.rpc_path = home / "rpc.sock"
        self.pub_path = home / "pub.sock"
        self._handlers = dict(handlers)
        self.quick = QuickServer(home / QUICK_SOCKET, self._handlers)  # list, ping: quick.py
        self._context = zmq.asyncio.Context()
        self._uid = os.getuid()
        self._router = self._context.socket(zmq.ROUTER)
        # XPUB: a PUB that also reports its subscriptions, so that log lines nobody
        # follows are never encoded (that costs more than the app's own writing).
        self._pub = self._context.socket(zmq.XPUB)
        self._subscriptions: dict[bytes, int] = {}  # topic prefix -> subscribers
        # the same socket, read without futures
        self._pub_reader: zmq.Socket[bytes] = zmq.Socket.shadow(self._pub.underlying)
        self._tasks: set[asyncio.Task[None]] = set()
        self._receiver: asyncio.Task[None] | None = None
        self._line_seq: dict[str, int] = {}  # log topic -> seq of its next line
        self.client_slots = 0

    def bind(self) -> None:
        # Clients take one of these slots before connecting, so that no burst of them
        # can make libzmq's accept() hit EMFILE, which aborts pmxd (see home.py).
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            limit = 1 << 20
        self.client_slots = prepare_client_slots(self.rpc_path.parent, limit)
        for sock in (self._router, self._pub):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IPC_FILTER_UID, self._uid)
        self._router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 4096)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._router.setsockopt(zmq.SNDHWM, 10000)
        # Per subscriber, in messages of at most MAX_PUBLICATION_BYTES: a subscriber that
        # stops reading costs at most PUBLISH_BUDGET_BYTES, then loses messages.
        self._pub.setsockopt(zmq.SNDHWM, PUBLISH_HWM)
        self._pub.setsockopt(zmq.MAXMSGSIZE, 4096)  # subscribers send only subscriptions
        # Every subscribe and unsubscribe, also those of a subscriber that went away, and
        # none ever dropped: `wants` counts them.
        self._pub.setsockopt(zmq.XPUB_VERBOSER, 1)
        self._pub.setsockopt(zmq.RCVHWM, 0)
        self._router.bind(f"ipc://{self.rpc_path}")
        self._pub.bind(f"ipc://{self.pub_path}")
        os.chmod(self.rpc_path, 0o600)
        os.chmod(self.pub_path, 0o600)

    async def start(self) -> None:
        self._receiver = asyncio.get_running_loop().create_task(self._receive_loop())
        await self.quick.start()

    def wants(self, topic: str) -> bool:
        """Whether a subscriber would receive `topic` now."""
        while True:  # the subscription messages that came since the last look
            try:
                message = self._pub_reader.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError as exc:
                log.warning("reading subscriptions failed: %s", exc)
                return True
            prefix, count = message[1:], self._subscriptions.get(message[1:], 0)
            if message[:1] == b"\x01":
                self._subscriptions[prefix] = count + 1
            elif message[:1] == b"\x00" and count > 1:
                self._subscriptions[prefix] = count - 1
            elif message[:1] == b"\x00":
                self._subscriptions.pop(prefix, None)
        name = topic.encode()
        return any(name.startswith(prefix) for prefix in self._subscriptions)

    def publish(self, topic: str, body: Mapping[str, object]) -> None:
        """Send at once, never queue here: PUB drops what a subscriber at its high-water
        mark cannot take (log lines carry "seq", so the subscriber can say so). What no
        subscriber would receive is not even encoded."""
        if self.wants(topic):
            self._send_all(topic, [encode_publication(topic, body)])

    def publish_lines(self, topic: str, head: Mapping[str, object], block: bytes) -> None:
        """An app's log lines as they are in its file, each numbered ("seq") so that a
        subscriber can tell how many it missed; sent as raw bytes (encode_log_block)."""
        if self.wants(topic):
            messages, self._line_seq[topic] = encode_log_block(
                topic, head, block, self._line_seq.get(topic, 0))
            self._send_all(topic, messages)

    def _send_all(self, topic: str, messages: list[list[bytes]]) -> None:
        for frames in messages:
            try:
                self._pub.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass  # a subscriber too slow for the stream loses messages, never the daemon
            except zmq.ZMQError as exc:
                log.warning("publish %s failed: %s", topic, exc)
                return

    async def _receive_loop(self) -> None:
        while True:
            try:
                frames = await self._router.recv_multipart(copy=False)
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                log.warning("control socket receive failed: %s", exc)
                continue
            identity = frames[0].bytes
            payload = frames[-1]
            if not self._sender_allowed(payload):
                log.warning("refused a request from another user (%s)",
                            _peer_address(payload))
                await self._send(identity, error_reply(None, ErrorCode.DENIED, "permission denied"))
                continue
            if len(frames) != 2:
                await self._send(identity, error_reply(
                    None, ErrorCode.BAD_FIELD, f"expected one frame, got {len(frames) - 1}"))
                continue
            task = asyncio.get_running_loop().create_task(self._serve(identity, payload.bytes))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _sender_allowed(self, frame: zmq.Frame) -> bool:
        address = _peer_address(frame)
        # libzmq gives ipc peers as "localhost:UID:GID:PID" (from SO_PEERCRED).
        parts = address.split(":")
        if len(parts) == 4 and parts[1].isdigit():
            return int(parts[1]) == self._uid
        return False

    async def _serve(self, identity: bytes, payload: bytes) -> None:
        request_id: str | None = None
        try:
            request = decode_request(payload)
            request_id = request.id
            handler = self._handlers.get(request.command)
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_COMMAND,
                                    f"command {request.command.value!r} is not served here",
                                    request_id)
            result = await handler(request)
            reply = Reply(request.id, True, result)
        except ProtocolError as exc:
            reply = error_reply(exc.request_id, exc.code, str(exc))
        except CommandError as exc:
            reply = error_reply(request_id, exc.code, str(exc))
        except PmxError as exc:
            reply = error_reply(request_id, ErrorCode.FAILED, str(exc))
        except asyncio.CancelledError:
            reply = error_reply(request_id, ErrorCode.FAILED, "pmxd is shutting down")
            await self._send(identity, reply)
            raise
        except Exception:
            log.exception("bug: request %s failed", request_id)
            reply = error_reply(request_id, ErrorCode.INTERNAL,
                                "internal error in pmxd; its log has the details")
        await self._send(identity, reply)

    async def _send(self, identity: bytes, reply: Reply) -> None:
        try:
            await self._router.send_multipart([identity, encode_reply(reply)])
        except zmq.ZMQError as exc:
            log.warning("reply %s could not be sent: %s", reply.id, exc)

    def close_now(self) -> None:
        """Close the sockets at once (before exec): pending requests are dropped."""
        self._router.close(linger=0)
        self._pub.close(linger=0)
        self._context.term()

    async def close(self) -> None:
        await self.quick.close()
        if self._receiver is not None:
            self._receiver.cancel()
            await asyncio.gather(self._receiver, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._router.close(linger=0)
        self._pub.close(linger=200)
        self._context.term()


def _peer_address(frame: zmq.Frame) -> str:
    try:
        return str(frame.get("Peer-Address"))
    except zmq.ZMQError:
        return ""
