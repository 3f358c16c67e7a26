"""tests/apps/py_hello.py that says when it is ready: READY=1 on $NOTIFY_SOCKET once bound.

Plain standard library: no pmx code and no signal handler. It answers "hello <pid>" on
$PORT and, right after the server is bound, sends READY=1 the four-line stdlib way
(systemd's notify protocol; a leading "@" is an abstract socket), as a `wait_ready = true`
app does. Outside pmx (no NOTIFY_SOCKET) it is py_hello.py.
"""

import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive connections
    disable_nagle_algorithm = True  # headers and body leave together: no 40 ms delayed ACK

    def do_GET(self) -> None:
        body = f"hello {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would only bury the test's output


server = ThreadingHTTPServer(("", int(os.environ.get("PORT", 18733))), Handler)
if path := os.environ.get("NOTIFY_SOCKET"):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"READY=1", path.replace("@", "\0", 1) if path[0] == "@" else path)
server.serve_forever()
