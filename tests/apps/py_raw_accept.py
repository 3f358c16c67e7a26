"""Answers "hello <pid>" from a bare blocking accept() loop: no socketserver, no signal handler.

DETACH=1 mimics uvloop: bind a socket.socket, detach its fd and listen in other code (libuv
calls listen() in C, where pmx's hook cannot see it), then wait for readiness and accept
without blocking, as libuv does.
"""

import os
import select
import socket

sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", int(os.environ["PORT"])))
detached = os.environ.get("DETACH") == "1"
if detached:
    sock = socket.socket(fileno=sock.detach())
    sock.setblocking(False)
sock.listen(16)
while True:
    if detached:
        select.select([sock], [], [])
        try:
            connection, _ = sock.accept()
        except BlockingIOError:
            continue
    else:
        connection, _ = sock.accept()
    with connection:
        connection.setblocking(True)
        connection.recv(65536)  # the test clients send one small request per connection
        body = f"hello {os.getpid()}\n".encode()
        connection.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
