"""Save and resurrect: the dump is itself a valid ecosystem file, written with tomli-w.

Writing is atomic: a temporary file in the same folder, fsync, then rename over the
dump, with the previous dump kept as dump.toml.bak. A failed write (disk full,
read-only folder) raises and leaves the previous dump byte-identical. The temporary is
created new with O_EXCL|O_NOFOLLOW and mode 0600 (safe_files.create_new): a file or
symlink left or planted at its name is removed, never written through.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

from .config import AppSpec, parse_ecosystem
from .errors import CommandError
from .safe_files import create_new


def write_dump(path: Path, specs: Sequence[AppSpec]) -> None:
    import tomli_w  # here: pmxd needs it only for `pmx save`

    document = {"apps": [spec.to_table() for spec in specs]}
    data = (b"# Written by `pmx save`; start it with `pmx resurrect` or `pmx start` on "
            b"this file.\n") + tomli_w.dumps(document).encode()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = create_new(str(temporary))  # 0600 whatever the umask; never through a link
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
