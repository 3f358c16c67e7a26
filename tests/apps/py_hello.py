"""Hello server as the http.server docs write one: answers "hello <pid>" on $PORT.

Plain standard library: no pmx code and no signal handler. pmx's Python startup hook is what
lets several of these share one port (tests/unit/test_preload_python.py).
"""

import os
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


ThreadingHTTPServer(("", int(os.environ.get("PORT", 18732))), Handler).serve_forever()
