"""`pmx import`: a PM2 ecosystem file or a Procfile written as pmx's ecosystem TOML.

The conversion is supervisor/pm2.py's, the same that `pmx start ecosystem.config.js`
uses, so the TOML starts exactly the apps the PM2 file starts. tomli-w writes no
comments, so each app's table is dumped on its own and preceded by `#` lines, one for
every key that was dropped or changed and why; the whole text is parsed back before it
is written, and must give the same apps.

`load_ecosystem` is what `pmx start FILE` and `pmx reload FILE` use to read a file: the
notes about a PM2 file are printed on stderr, one line each, so that nothing is dropped
silently. Registered on the `pmx` group by main.py.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click
from pmx.supervisor.errors import ConfigError

from . import render, usage
from .outcome import handles_errors

if TYPE_CHECKING:
    from pmx.supervisor.config import AppSpec
    from pmx.supervisor.pm2 import Note

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def load_ecosystem(path: str, *, env_name: str | None = None,
                   only: Sequence[str] = ()) -> list[AppSpec]:
    """parse_ecosystem, with the notes about a PM2 file or Procfile on stderr."""
    from pmx.supervisor.config import parse_ecosystem

    notes: list[Note] = []
    specs = parse_ecosystem(path, env_name=env_name, only=only, notes=notes)
    for note in notes:  # neutralised: a key of the file could hold escape sequences
        click.echo(render.neutralise(f"[pmx] {path}: {note}"), err=True)
    return specs


def _comment(text: str) -> list[str]:
    """`text` as `#` lines of at most ~100 characters; control characters become spaces
    (a key of the PM2 file must not end the comment)."""
    import textwrap

    clean = "".join(char if char.isprintable() else " " for char in text)
    return [f"# {line}" for line in textwrap.wrap(clean, width=96, subsequent_indent="  ")]


def render_toml(tables: list[dict[str, object]], notes: Sequence[Note], source: str,
                output: str | None = None) -> str:
    """The apps as an ecosystem TOML, each table after the comments about it."""
    head = [f"# pmx ecosystem file, converted from {source} by pmx import.",
            f"# Start it with: pmx start {output or 'ecosystem.toml'}. Every option: "
            "pmx describe NAME, or the README."]
    if output is None:
        head += _comment(f"Relative paths are relative to the folder of {source}: keep this "
                         "file there, or use pmx import -o FILE.")
    file_notes = [note for note in notes if note.app is None]
    if file_notes:
        head.append("#")
        for note in file_notes:
            head += _comment(f"{note.key} {note.action}: {note.reason}")
    chunks = ["\n".join(head) + "\n"]
    for table in tables:
        lines = []
        for note in notes:
            if note.app is not None and note.app == table.get("name"):
                lines += _comment(f"{note.key} {note.action}: {note.reason}")
        chunks.append("".join(line + "\n" for line in lines) + _app_table(table))
    return "\n".join(chunks)


def _app_table(table: dict[str, object]) -> str:
    """One [[apps]] table, name and script first, with its env tables as [apps.env...]
    sections: tomli-w alone would write a short app as an inline `apps = [{...}]`."""
    import tomli_w

    first = {key: table[key] for key in ("name", "script") if key in table}
    scalars = first | {key: value for key, value in table.items()
                       if key not in first and not isinstance(value, dict)}
    text = "[[apps]]\n" + tomli_w.dumps(scalars)
    for key, value in table.items():
        if isinstance(value, dict):
            name = key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)
            text += f"\n[apps.{name}]\n" + tomli_w.dumps(value)
    return text


def _rebase(tables: list[dict[str, object]], source_dir: Path, out_dir: Path) -> None:
    """Relative paths are relative to the file's folder: keep them pointing at the same
    place from the folder the TOML is written to."""
    if source_dir == out_dir:
        return
    for table in tables:
        cwd = table.get("cwd")
        if isinstance(cwd, str) and os.path.isabs(cwd):
            continue
        target = os.path.normpath(source_dir / (cwd if isinstance(cwd, str) else "."))
        table["cwd"] = os.path.relpath(target, out_dir)


def _specs(tables: list[dict[str, object]], source: str, base_dir: Path) -> list[AppSpec]:
    from pmx.supervisor.config import parse_app

    specs = [parse_app(table, source=source, index=index, base_dir=base_dir)
             for index, table in enumerate(tables)]
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f'{source}: two apps are named "{duplicates[0]}"; pmx names are unique')
    return specs


def convert_file(file: str, output: str | None) -> tuple[str, list[Note], int]:
    """The TOML text for `file` (paths rebased to `output`'s folder), its notes, and
    how many apps it holds."""
    import tomllib

    from pmx.supervisor import pm2

    path = Path(file)
    if pm2.file_kind(path) == "toml":
        raise ConfigError(f"{file}: already an ecosystem TOML; pmx start it as it is")
    tables, notes = pm2.load(path, file)
    source_dir = path.resolve().parent
    out_dir = Path(output).resolve().parent if output else source_dir
    _specs(tables, file, source_dir)  # an invalid app is an error, not a TOML that fails later
    _rebase(tables, source_dir, out_dir)
    text = render_toml(tables, notes, os.path.basename(file),
                       os.path.basename(output) if output else None)
    again = tomllib.loads(text)["apps"]
    if _specs(again, file, out_dir) != _specs(tables, file, out_dir):  # pragma: no cover - a bug
        raise AssertionError(f"{file}: the TOML written does not give back the same apps")
    return text, notes, len(tables)


@click.command(name="import")
@click.argument("file")
@click.option("-o", "--output", metavar="OUT", help="write the TOML here (default: stdout)")
@click.option("--force", is_flag=True, help="replace OUT if it exists")
@handles_errors
def import_command(file: str, output: str | None, force: bool) -> None:
    """Convert a PM2 ecosystem file or a Procfile to pmx TOML.

    FILE is an ecosystem.config.js (.cjs, .mjs), .json, .yml or a Procfile. Every key
    dropped or changed is a comment in the TOML, saying why. A .js file is a program:
    it is run with node to read what it exports.

    \b
      pmx import ecosystem.config.js -o ecosystem.toml
      pmx import Procfile > ecosystem.toml
    """
    if output and os.path.exists(output) and not force:
        usage.refuse(f"{output} exists; pmx import ... --force replaces it")
    text, notes, count = convert_file(file, output)
    if not output:
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{output}: cannot write: {exc.strerror or exc}") from None
    click.echo(f"[pmx] wrote {output}: {count} app{'s' if count != 1 else ''} from {file}; "
               f"{len(notes)} key{'s' if len(notes) != 1 else ''} dropped or changed"
               + (" (comments in the file):" if notes else ""), err=True)
    for note in notes:
        click.echo(render.neutralise(f"[pmx]   {note}"), err=True)


COMMANDS = (import_command,)
