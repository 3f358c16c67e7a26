"""The `pmx` program: a short path for the commands people run most, main.py for the rest.

`pmx list`, `ls`, `status` (with or without --json) and `pmx ping` are typed many times
a day and run by scripts in loops. They take this path, which imports neither click nor
rich nor pyzmq: it asks pmxd's quick socket (supervisor/quick.py, a plain Unix socket)
and draws with the plain table writer, so the command costs little more than the
interpreter's start. When the quick socket does not answer at once (no pmxd, an older
one, a busy one), the same command goes through the control socket (cli/client.py),
which says why pmxd does not answer. Any other command line, including these commands
with other options or `--help`, goes to the full command line in main.py, with the same
output and exit codes.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing's own import would cost every `pmx list`; mypy reads this
if TYPE_CHECKING:
    from pmx.supervisor.protocol import JsonObject

QUICK_SOCKET = "quick.sock"  # home.QUICK_SOCKET, without importing home.py (pathlib)

SHORT_PATH = {("list",), ("ls",), ("status",), ("list", "--json"), ("ls", "--json"),
              ("status", "--json"), ("ping",)}


def main() -> None:
    argv = tuple(sys.argv[1:])
    if argv in SHORT_PATH:
        sys.exit(_short(argv))
    from .main import main as full_main

    full_main()


QUICK_TIMEOUT_S = 1.0  # then the control socket, with its diagnostics


def _quick_call(command: str) -> JsonObject | None:
    """The result of `command` from pmxd's quick socket; None when it does not answer."""
    import os
    import socket

    from pmx.supervisor.errors import ProtocolError
    from pmx.supervisor.protocol import Command, Request, decode_reply, encode_request

    home = os.environ.get("PMX_HOME") or os.path.join(os.path.expanduser("~"), ".pmx")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(QUICK_TIMEOUT_S)
    chunks: list[bytes] = []
    try:
        sock.connect(os.path.join(os.path.abspath(home), QUICK_SOCKET))
        sock.sendall(encode_request(Request(Command(command))))
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(1 << 18):
            chunks.append(chunk)
        reply = decode_reply(b"".join(chunks))
    except (OSError, ProtocolError):
        return None
    finally:
        sock.close()
    return reply.result if reply.ok else None


def _call(command: str) -> JsonObject:
    result = _quick_call(command)
    if result is not None:
        return result
    from pmx.supervisor.protocol import Command

    from .client import Client  # imports pyzmq: only when the quick socket did not answer

    return Client().call(Command(command), timeout_s=5)


def _short(argv: tuple[str, ...]) -> int:
    from pmx.supervisor.errors import PmxError

    from . import render

    try:
        if argv == ("ping",):
            sys.stdout.write(render.ping_line(_call("ping")) + "\n")
            return 0
        rows = _call("list").get("instances")
        if "--json" in argv:
            render.print_json(rows)
        else:
            render.instance_table([row for row in rows if isinstance(row, dict)]
                                  if isinstance(rows, list) else [])
    except PmxError as exc:
        sys.stderr.write(render.error_line(str(exc)) + "\n")
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pmx list | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0
    return 0


if __name__ == "__main__":
    main()
