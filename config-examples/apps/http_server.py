"""A standard-library HTTP server that works alone or in a pmx cluster.

In a cluster it serves on the socket pmx passes as fd 3 (systemd socket activation:
LISTEN_FDS / LISTEN_PID); alone it binds $PORT. It answers with its pid, so you can see
requests spread over instances, and it drains cleanly on SIGTERM: it stops accepting,
finishes the requests in flight, closes idle keep-alive connections and exits. That is
the contract every app must keep for a zero-downtime `pmx reload`.
"""

import os
import signal
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    # TCP only: headers and body leave at once, no 40 ms delayed ACK. Set in main().
    disable_nagle_algorithm = False

    def do_GET(self) -> None:
        body = f"hello from pid {os.getpid()} (instance {os.environ.get('PMX_INSTANCE')})\n"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        if draining.is_set():
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would drown the logs


draining = threading.Event()


def inherited_socket() -> socket.socket | None:
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0")):
        return socket.socket(fileno=3)
    return None


class Server(ThreadingHTTPServer):
    daemon_threads = False  # finish in-flight requests before exiting
    block_on_close = True


def main() -> None:
    sock = inherited_socket()
    if sock is not None:
        server = Server(sock.getsockname(), Handler, bind_and_activate=False)
        server.socket.close()
        # Instances share this socket: accept without blocking, or a draining instance
        # could wait in accept() for a connection another instance already took.
        sock.setblocking(False)
        server.socket = sock
    else:
        server = Server(("127.0.0.1", int(os.environ.get("PORT", "8000"))), Handler)
    Handler.disable_nagle_algorithm = server.socket.family != socket.AF_UNIX

    def drain(signum: int, frame: object) -> None:
        draining.set()
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    print(f"pid {os.getpid()} serving on {server.socket.getsockname()}", flush=True)
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    print(f"pid {os.getpid()} drained and stopped", flush=True)


if __name__ == "__main__":
    main()
