"""pmx's startup hook for Python cluster instances, loaded as `sitecustomize`.

pmx puts this directory first on PYTHONPATH of its own cluster children only, so that an
unmodified server started N times (`pmx start app.py -i 4`) shares one port, as in PM2:
`bind()` on the cluster's port becomes the daemon-owned listening socket (PMX_CLUSTER_SOCKETS),
each listening socket is reported to the daemon on NOTIFY_SOCKET (that is also the readiness
signal), and a socketserver-based server (http.server, Flask's dev server) is drained on
SIGTERM/SIGINT when the app has no handler of its own. The contract with the daemon is in
ARCHITECTURE.md ("Preloads"). Standard library only, Python 3.9+, Linux; it never raises into
the app, and it runs the next `sitecustomize` on sys.path so it never hides the user's own.
"""

from __future__ import annotations

import _thread
import os
import select
import signal
import socket
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import socketserver
    from http.server import BaseHTTPRequestHandler
    from types import FrameType

_HERE = os.path.dirname(os.path.realpath(__file__))
_FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}
# In a drain, a connection waiting for a request (its next one, or a new connection's first) is
# closed once it has been idle this long since the drain began or since its last response,
# whichever is later. Closing it sooner races its client: a keep-alive client sends its next
# request as soon as it has read a response, and a request that meets the close gets a reset. A
# busy connection never gets this far: its next response says `Connection: close` and its handler
# closes it cleanly after that. Only a client silent this long can still race the close, as it
# would race any server's keep-alive timeout. Short, as a drain waits this long for idle
# connections; long against a client's think time between two requests and against scheduling
# delays of a loaded machine (a thread waiting for the GIL is not an idle client).
_IDLE_GRACE_S = 0.5

_real: dict[str, Any] = {}  # the methods the hook wraps, by name


class _Listener:
    """What the hook knows about one app TCP socket bound to a fixed port."""

    __slots__ = ("adopted", "in_socketserver", "reported")

    def __init__(self, adopted: bool) -> None:
        self.adopted, self.reported, self.in_socketserver = adopted, False, False


_entries: list[tuple[int, str, int, int]] = []  # (family, host, port, fd) from PMX_CLUSTER_SOCKETS
_managed: weakref.WeakKeyDictionary[socket.socket, _Listener] = weakref.WeakKeyDictionary()
_serving: dict[int, tuple[socketserver.BaseServer, threading.Thread]] = {}  # id -> in serve_forever
_active: set[object] = set()  # requests a ThreadingMixIn thread is handling
_waiting: dict[socket.socket, float] = {}  # connection -> when its handler began to wait for a request
_draining = False
_handlers_installed = False


def _parse_entries(text: str) -> list[tuple[int, str, int, int]]:
    entries: list[tuple[int, str, int, int]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        address, _, fd = item.rpartition("=")  # an inet6 host has colons, never "="
        family, _, rest = address.partition("/")
        host, _, port = rest.rpartition("/")
        try:
            entries.append((_FAMILIES[family], host, int(port), int(fd)))
        except (KeyError, ValueError):
            sys.stderr.write(f"pmx: ignoring malformed PMX_CLUSTER_SOCKETS entry {item!r}\n")
    return entries


def _canonical(family: int, host: str) -> object:
    try:
        return socket.inet_pton(family, host or ("0.0.0.0" if family == socket.AF_INET else "::"))
    except (OSError, ValueError):
        return host  # a name: compared as written


def _is_listening(family: int, port: int, fd: int) -> bool:
    # Python grandchildren inherit this environment but not necessarily the fds: check what the
    # fd is before replacing the app's socket with it.
    try:
        probe = socket.socket(fileno=fd)  # family and type read from the fd
    except OSError:
        return False
    try:
        return (probe.family == family and probe.type == socket.SOCK_STREAM
                and probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0
                and probe.getsockname()[1] == port)
    except OSError:
        return False
    finally:
        _real["detach"](probe)  # leave the fd open


def _find_entry(family: int, host: Any, port: int) -> tuple[int, str, int, int] | None:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    fits = [e for e in _entries if e[0] == family and e[2] == port and _is_listening(family, port, e[3])]
    wanted = _canonical(family, str(host))
    return next((e for e in fits if _canonical(family, e[1]) == wanted), fits[0] if fits else None)


def _bind(self: socket.socket, address: Any) -> None:
    if (self.family not in (socket.AF_INET, socket.AF_INET6) or self.type != socket.SOCK_STREAM
            or not isinstance(address, tuple) or len(address) < 2 or not isinstance(address[0], (str, bytes))
            or not isinstance(address[1], int) or address[1] == 0):
        _real["bind"](self, address)
        return
    entry = _find_entry(self.family, address[0], address[1])
    if entry is None:
        _real["bind"](self, address)
        _managed[self] = _Listener(adopted=False)
        return
    # This socket now *is* the daemon's listening socket (same open file description). Its
    # O_NONBLOCK flag is shared by every instance: set it, as Node and Go do, so an instance that
    # loses the race for a connection gets EAGAIN instead of blocking in accept().
    os.dup2(entry[3], self.fileno(), inheritable=False)
    os.set_blocking(self.fileno(), False)
    _managed[self] = _Listener(adopted=True)


def _listen(self: socket.socket, *backlog: int) -> None:
    listener = _managed.get(self)
    # An adopted socket listens already, with the daemon's backlog: listen() with the app's
    # (http.server asks for 5) would shrink it for every instance.
    if listener is None or not listener.adopted:
        _real["listen"](self, *backlog)
    if listener is not None and not listener.reported:
        listener.reported = True
        _report(self, listener.adopted)
        _on_listening()


def _detach(self: socket.socket) -> int:
    listener = _managed.get(self)
    if listener is not None and not listener.reported:
        # uvloop binds a socket.socket, detaches it and lets libuv call listen() in C.
        listener.reported = True
        _report(self, listener.adopted)
    return _real["detach"](self)  # type: ignore[no-any-return]


def _accept(self: socket.socket) -> tuple[socket.socket, Any]:
    try:
        return _real["accept"](self)  # type: ignore[no-any-return]
    except BlockingIOError:
        listener = _managed.get(self)
        if listener is None or listener.in_socketserver or self.gettimeout() is not None:
            raise  # socketserver polls first and shrugs off EAGAIN; so do non-blocking apps
    # Another instance took the connection: emulate the blocking accept() the app asked for.
    poller = select.poll()
    poller.register(self, select.POLLIN)
    while True:
        poller.poll()
        try:
            return _real["accept"](self)  # type: ignore[no-any-return]
        except BlockingIOError:
            continue


def _shutdown(self: socket.socket, how: int) -> None:
    listener = _managed.get(self)
    if listener is not None and (listener.adopted or listener.reported):
        return None  # on Linux this would stop the shared socket listening for every instance
    return _real["shutdown"](self, how)  # type: ignore[no-any-return]


def _report(sock: socket.socket, adopted: bool) -> None:
    """Send PMX_LISTENING to the daemon, which learns our pid from the kernel."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    try:
        host, port = sock.getsockname()[:2]
        family = "inet6" if sock.family == socket.AF_INET6 else "inet"
        message = (f"PMX_LISTENING={family}/{host}/{port}\nPMX_LISTEN_FD={sock.fileno()}\n"
                   f"PMX_ADOPTED={int(adopted)}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.sendto(message.encode(), "\0" + address[1:] if address[0] == "@" else address)
    except Exception as exc:
        sys.stderr.write(f"pmx: could not report a listening socket: {exc}\n")


def _on_listening() -> None:
    global _handlers_installed
    _patch_servers()
    if _handlers_installed or threading.current_thread() is not threading.main_thread():
        return
    _handlers_installed = True
    for signum in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(signum)
        if handler == signal.SIG_DFL or (signum == signal.SIGINT and handler is signal.default_int_handler):
            signal.signal(signum, _on_stop_signal)  # an app that installs its own later wins


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    # Runs in the main thread, possibly between any two bytecodes of the app, so it takes no lock
    # and starts its helper with _thread (threading.Thread.start takes a lock the interrupted
    # main thread may hold while it starts a request thread).
    global _draining
    if _draining:
        return
    servers = list(_serving.values())
    if not servers:  # nothing to drain: do what the default handler would have done
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _draining = True
    for server, _ in servers:
        # We may be inside this very serve_forever: shutdown() would wait for it forever.
        server._BaseServer__shutdown_request = True  # type: ignore[attr-defined]
    main_serves = any(thread is threading.main_thread() for _, thread in servers)
    _thread.start_new_thread(_watch_drain, (main_serves, time.monotonic()))


def _watch_drain(main_serves: bool, started: float) -> None:
    """Close connections idle for _IDLE_GRACE_S; end the process once everything is drained, or
    at 90% of the kill timeout at the latest."""
    kill_timeout_ms = os.environ.get("PMX_KILL_TIMEOUT_MS", "")
    deadline = started + 0.9 * (int(kill_timeout_ms) if kill_timeout_ms.isdigit() else 5000) / 1000
    while time.monotonic() < deadline:
        now = time.monotonic()
        for connection, since in list(_waiting.items()):
            if now - max(since, started) < _IDLE_GRACE_S or _has_input(connection):
                continue  # its client may still send a request, or has sent one: let it be answered
            _waiting.pop(connection, None)
            try:
                # SHUT_RD wakes the handler blocked reading the next request with EOF, yet still
                # lets it read a request already received and write its answer.
                connection.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        if not main_serves and not _serving and not _active:
            break  # the servers ran in other threads: the main thread is not ours to end
        time.sleep(0.05)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(0)


def _has_input(connection: socket.socket) -> bool:
    """Whether bytes (or the client's FIN) wait to be read: a request its handler has not read yet,
    say while it waits for the GIL. poll(), as recv(MSG_PEEK) would block on a socket with a timeout."""
    try:
        poller = select.poll()
        poller.register(connection, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):  # closed meanwhile: its handler is done with it
        return True


def _serve_forever(self: socketserver.BaseServer, poll_interval: float = 0.5) -> None:
    if poll_interval == 0.5:  # socketserver's default, which werkzeug passes explicitly:
        poll_interval = 0.1  # notice a drain within 0.1 s
    sock = getattr(self, "socket", None)
    if isinstance(sock, socket.socket) and sock in _managed:
        _managed[sock].in_socketserver = True
    _serving[id(self)] = (self, threading.current_thread())  # by id: a server may be unhashable
    if _draining:
        self._BaseServer__shutdown_request = True  # type: ignore[attr-defined]
    try:
        _real["serve_forever"](self, poll_interval)
    finally:
        _serving.pop(id(self), None)
    if not _draining:
        return  # the app called shutdown() itself
    while _active or _serving:  # in-flight requests, other servers; _watch_drain bounds this
        time.sleep(0.02)
    self.server_close()  # joins non-daemon request threads
    if threading.current_thread() is threading.main_thread():
        sys.exit(0)  # the app's code after serve_forever() does not run: it would have been killed


def _process_request(self: socketserver.ThreadingMixIn, request: Any, client_address: Any) -> None:
    _active.add(request)  # before the thread starts, so a drain cannot miss it
    try:
        _real["process_request"](self, request, client_address)
    except BaseException:
        _active.discard(request)
        raise


def _process_request_thread(self: socketserver.ThreadingMixIn, request: Any, client_address: Any) -> None:
    try:
        _real["process_request_thread"](self, request, client_address)
    finally:
        _active.discard(request)


def _handle_one_request(self: BaseHTTPRequestHandler) -> None:
    connection = self.connection
    _waiting[connection] = time.monotonic()  # right after the previous response, or the accept
    try:
        _real["handle_one_request"](self)
    finally:
        _waiting.pop(connection, None)


def _parse_request(self: BaseHTTPRequestHandler) -> bool:
    _waiting.pop(getattr(self, "connection", None), None)  # type: ignore[arg-type]
    return bool(_real["parse_request"](self))


def _end_headers(self: BaseHTTPRequestHandler) -> None:
    if _draining and not getattr(self, "close_connection", True):
        # A "Connection: keep-alive" the app sent would come first, and clients read the first
        # one: it would keep the connection the handler is about to close.
        buffered = getattr(self, "_headers_buffer", None)
        if isinstance(buffered, list):
            buffered[:] = [line for line in buffered if not _says_keep_alive(line)]
        self.send_header("Connection", "close")  # also sets close_connection
    _real["end_headers"](self)


def _says_keep_alive(line: object) -> bool:
    if not isinstance(line, bytes):
        return False
    name, _, value = line.partition(b":")
    return name.strip().lower() == b"connection" and value.strip().lower() == b"keep-alive"


def _patch(cls: type, **wrappers: Any) -> None:
    for name, wrapper in wrappers.items():
        _real[name] = getattr(cls, name)
        setattr(cls, name, wrapper)


def _patch_servers() -> None:
    """Wrap socketserver and http.server, if the app uses them (a server imports them before it
    listens); importing them ourselves would cost every instance ~20 ms."""
    servers, http_server = sys.modules.get("socketserver"), sys.modules.get("http.server")
    if servers is not None and "serve_forever" not in _real:
        _patch(servers.BaseServer, serve_forever=_serve_forever)
        _patch(servers.ThreadingMixIn, process_request=_process_request,
               process_request_thread=_process_request_thread)
    if http_server is not None and "end_headers" not in _real:
        _patch(http_server.BaseHTTPRequestHandler, handle_one_request=_handle_one_request,
               parse_request=_parse_request, end_headers=_end_headers)


def _install() -> None:
    _entries.extend(_parse_entries(os.environ.get("PMX_CLUSTER_SOCKETS", "")))
    # asyncio, socketserver, werkzeug and uvicorn all create socket.socket objects.
    _patch(socket.socket, bind=_bind, listen=_listen, accept=_accept, shutdown=_shutdown, detach=_detach)


def _chain() -> None:
    """Run the sitecustomize this one hides (the user's, or the distro's) as site.py would."""
    import importlib.machinery
    import importlib.util

    path = [p for p in sys.path if not isinstance(p, str) or os.path.realpath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    ours, module = sys.modules[__name__], importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        sys.modules["sitecustomize"] = ours
        if isinstance(err, ImportError) and err.name == "sitecustomize":
            pass
        elif sys.flags.verbose:
            sys.excepthook(*sys.exc_info())
        else:
            sys.stderr.write("Error in sitecustomize; set PYTHONVERBOSE for traceback:\n"
                             f"{err.__class__.__name__}: {err}\n")


sys.modules["_pmx_sitecustomize"] = sys.modules[__name__]  # stays reachable once chained
if os.environ.get("PMX_CLUSTER") == "1":
    try:
        _install()
    except Exception as exc:
        sys.stderr.write(f"pmx: cluster hook disabled: {type(exc).__name__}: {exc}\n")
try:
    _chain()
except Exception as exc:
    sys.stderr.write(f"pmx: could not run the next sitecustomize: {exc}\n")
