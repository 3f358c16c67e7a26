"""http.server hello with its own SIGTERM handler, installed after it starts listening: the
handler shuts the listening socket down (to wake an accept, as some apps do) and exits 7."""

import os
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def stop(signum: int, frame: object) -> None:
    server.socket.shutdown(socket.SHUT_RDWR)
    sys.exit(7)


server = ThreadingHTTPServer(("", int(os.environ["PORT"])), Handler)
signal.signal(signal.SIGTERM, stop)
server.serve_forever()
