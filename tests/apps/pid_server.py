"""Test HTTP app: answers "pid N" on the socket pmx passes (fd 3) or on $PORT.

Knobs (environment): READY_DELAY seconds before serving; NOTIFY=1 sends READY=1 to
$NOTIFY_SOCKET once serving; FAIL_AT_START=N exits with N at once; SLOW_S makes
/slow take that long. On SIGTERM it drains: stops accepting, finishes in-flight
requests, closes keep-alive connections, exits 0.
"""

import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

if os.environ.get("FAIL_AT_START"):
    print("failing at start on purpose", file=sys.stderr, flush=True)
    sys.exit(int(os.environ["FAIL_AT_START"]))

draining = threading.Event()


def leak() -> None:
    """LEAK_MB_PER_S in the instance numbered LEAK_INSTANCE: grow until restarted."""
    held = []
    while True:
        held.append(bytearray(b"x" * (1024 * 1024)))
        time.sleep(1.0 / float(os.environ["LEAK_MB_PER_S"]))


if os.environ.get("LEAK_MB_PER_S") and os.environ.get("LEAK_INSTANCE") == os.environ.get(
        "PMX_INSTANCE"):
    threading.Thread(target=leak, daemon=True).start()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP only: headers and body leave at once, no 40 ms delayed ACK. Set in main().
    disable_nagle_algorithm = False

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(float(os.environ.get("SLOW_S", "1")))
        body = f"pid {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if draining.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True


time.sleep(float(os.environ.get("READY_DELAY", "0")))
if os.environ.get("LISTEN_PID") == str(os.getpid()):
    sock = socket.socket(fileno=3)
    server = Server(sock.getsockname(), Handler, bind_and_activate=False)
    server.socket.close()
    sock.setblocking(False)  # shared with the other instances: never wait in accept()
    server.socket = sock
    Handler.disable_nagle_algorithm = sock.family != socket.AF_UNIX
else:
    server = Server(("127.0.0.1", int(os.environ["PORT"])), Handler)


def drain(signum: int, frame: object) -> None:
    draining.set()
    threading.Thread(target=server.shutdown).start()


signal.signal(signal.SIGTERM, drain)
signal.signal(signal.SIGINT, drain)
if os.environ.get("NOTIFY") and os.environ.get("NOTIFY_SOCKET"):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.sendto(b"READY=1\nSTATUS=serving", os.environ["NOTIFY_SOCKET"])
print(f"serving pid {os.getpid()} fds={sorted(int(f) for f in os.listdir('/proc/self/fd'))}",
      flush=True)
server.serve_forever(poll_interval=0.05)
server.server_close()
