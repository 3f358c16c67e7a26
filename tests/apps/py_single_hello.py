"""Like py_hello.py with the single-threaded HTTPServer of the http.server docs: requests, and
keep-alive connections between requests, are handled in the main thread."""

import os
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        body = f"hello {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


HTTPServer(("", int(os.environ.get("PORT", 18733))), Handler).serve_forever()
