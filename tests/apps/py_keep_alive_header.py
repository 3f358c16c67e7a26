"""py_hello.py whose handler says "Connection: keep-alive" itself, as handlers written after
HTTP/1.0 examples do: in a drain the answer must still say only "Connection: close"."""

import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        body = f"hello {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Connection", "keep-alive")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


ThreadingHTTPServer(("", int(os.environ.get("PORT", 18734))), Handler).serve_forever()
