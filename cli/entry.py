"""The `pmx` program: a short path for the commands people run most, main.py for the rest.

`pmx list`, `ls`, `status` (with or without --json) and `pmx ping` are typed many times
a day and run by scripts in loops. They take this path, which imports neither click nor
rich nor anything the daemon side needs, only the client (pyzmq) and the plain table
writer: the command costs the interpreter's start, pyzmq's import and one round trip.
Any other command line, including these commands with other options or `--help`, goes
to the full command line in main.py, with the same output and exit codes.
"""

from __future__ import annotations

import sys

SHORT_PATH = {("list",), ("ls",), ("status",), ("list", "--json"), ("ls", "--json"),
              ("status", "--json"), ("ping",)}


def main() -> None:
    argv = tuple(sys.argv[1:])
    if argv in SHORT_PATH:
        sys.exit(_short(argv))
    from .main import main as full_main

    full_main()


def _short(argv: tuple[str, ...]) -> int:
    from pmx.supervisor.errors import PmxError
    from pmx.supervisor.protocol import Command

    from . import render
    from .client import Client

    try:
        client = Client()
        if argv == ("ping",):
            sys.stdout.write(render.ping_line(client.call(Command.PING, timeout_s=5)) + "\n")
            return 0
        rows = client.call(Command.LIST).get("instances")
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
