"""Procfiles (Heroku, foreman, honcho) -> pmx app tables.  Standard library only.

    web: gunicorn app:app --bind 0.0.0.0:$PORT
    worker: python worker.py --queue default

Each `name: command` line is one app (fork mode, one instance); blank lines and `#`
comments are skipped. A command without shell syntax runs directly, its first word the
program, as the shell would run it. A command with shell syntax (`$PORT`, quotes, `&&`,
pipes, redirections) runs as `sh -c COMMAND`; a single command gets `exec` in front, so
that the stop signal reaches the program rather than the shell.

PORT: like foreman, each app gets its own `PORT` in its env: 5000 for the first line,
5100 for the second, and so on. `pmx import Procfile` writes them out to be changed.
Called by pm2.load for a file named Procfile or Procfile.*.
"""

from __future__ import annotations

import re
import shlex
from typing import TYPE_CHECKING

from .errors import ConfigError
from .options import quote

if TYPE_CHECKING:
    from .pm2 import Converted

FIRST_PORT = 5000
PORT_STEP = 100
_LINE = re.compile(r"^([A-Za-z0-9_-]+)\s*:\s*(.*?)\s*$")
_SHELL_SYNTAX = re.compile(r"""[$'"`|&;<>()*?~{}\[\]#\\\n]""")
_SEVERAL = re.compile(r"[;&|\n]|(^|\s)(if|for|while|case|until)\s")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def command_table(command: str) -> dict[str, object]:
    """The keys that run one Procfile command as foreman would."""
    if not _SHELL_SYNTAX.search(command):
        argv = shlex.split(command)
        return {"script": argv[0], "args": argv[1:], "interpreter": "none"}
    single = not _SEVERAL.search(command) and not _ASSIGNMENT.match(command)
    return {"script": "sh", "args": ["-c", f"exec {command}" if single else command],
            "interpreter": "none"}


def parse_procfile(text: str, source: str) -> Converted:
    from .pm2 import Note

    tables: list[dict[str, object]] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise ConfigError(f'{source}: line {number}: expected "name: command", '
                              f"got {quote(line.strip()[:60])}")
        name, command = match.groups()
        if not command:
            raise ConfigError(f"{source}: line {number}: {quote(name)} has no command")
        if name in seen:
            raise ConfigError(f"{source}: line {number}: {quote(name)} is defined twice")
        seen.add(name)
        port = FIRST_PORT + PORT_STEP * len(tables)
        tables.append({"name": name, **command_table(command), "env": {"PORT": str(port)}})
    if not tables:
        raise ConfigError(f'{source}: no "name: command" line')
    note = Note(None, "env.PORT", "added",
                f"each app gets PORT as foreman numbers them: {FIRST_PORT}, "
                f"{FIRST_PORT + PORT_STEP}, ...")
    return tables, [note]
