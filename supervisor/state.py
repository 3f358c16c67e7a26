"""Save and resurrect: the dump is itself a valid ecosystem file, written with tomli-w.

Writing is atomic: a temporary file in the same folder, fsync, then rename over the
dump, with the previous dump kept as dump.toml.bak. A failed write (disk full,
read-only folder) raises and leaves the previous dump byte-identical.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import tomli_w

from .config import AppSpec, parse_ecosystem
from .errors import CommandError

DUMP_NAME = "dump.toml"


def write_dump(path: Path, specs: Sequence[AppSpec]) -> None:
    document = {"apps": [spec.to_table() for spec in specs]}
    data = (b"# Written by `pmx save`; start it with `pmx resurrect` or `pmx start` on "
            b"this file.\n") + tomli_w.dumps(document).encode()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if path.exists():
            backup = path.with_name(path.name + ".bak")
            with contextlib.suppress(FileNotFoundError):
                backup.unlink()
            os.link(path, backup)
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise CommandError("failed", f"cannot write {path}: {exc.strerror or exc}; "
                                     "the previous dump is unchanged") from None


def read_dump(path: Path) -> list[AppSpec]:
    """The dump's apps; a dump saved empty (`pmx save --force`) holds `apps = []`."""
    import tomllib

    if not path.exists():
        return []
    try:
        if tomllib.loads(path.read_text(encoding="utf-8")).get("apps") == []:
            return []
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        pass  # parse_ecosystem says what is wrong
    return parse_ecosystem(path)


# ---------------------------------------------------------------- the live state file
#
# pmxd rewrites home/state.json whenever an instance starts or stops: which apps run
# (their full settings and environment) and, per instance, the pid, its process group
# and the kernel's start time of that pid. When a pmxd dies (SIGKILL, OOM) and a new one
# starts on the same home, it reads the file, stops every recorded process that is still
# alive *and* still the same process (same start time, so a recycled pid is never
# touched), then starts the apps again. The choice is to stop, not re-adopt: the old
# daemon's end closed the pipes carrying the apps' output and the sockets' owner is gone,
# so a re-adopted app would log into a broken pipe. A restart is one short gap; a
# re-adopted half-working app is an outage nobody sees.

STATE_NAME = "state.json"


def process_start_time(pid: int) -> int | None:
    """The start time of a pid in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == b"Z":
        return None
    return int(fields[19])


def write_state(path: Path, document: dict[str, object]) -> None:
    import json

    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = json.dumps(document, separators=(",", ":")).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(temporary, path)


def read_state(path: Path) -> dict[str, object] | None:
    import json

    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None
