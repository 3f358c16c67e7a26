"""Hostile output: one line of argv[1] bytes (default 10 MB) with no newline inside it,
then terminal escape sequences (clear screen, set the window title), invalid UTF-8, and
"done". Writes raw bytes to fd 1; then idles."""

import os
import sys
import time

size = int(sys.argv[1]) if len(sys.argv) > 1 else 10 * 1000 * 1000


def write(data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]


write(b"A" * size + b"\n")
write(b"after the long line\n")
write(b"escape \x1b[2J\x1b]0;pwned\x07 end\n")
write(b"invalid \xff\xfe\xc3\x28 utf8\n")
write(b"done\n")
while True:
    time.sleep(3600)
