"""Ecosystem TOML -> typed, frozen AppSpec values.  Standard library only.

Every option is declared once, in `options.OPTIONS` (its name, parser, default and
help); that table drives parsing here, `describe`, the wire format and the dump.

Every error is one line naming the file, the app and the key, with what was expected
and what was found:

    ecosystem.toml: app "api" (apps[1]): unknown key "instnaces"; did you mean "instances"?

Nothing here touches a process: the CLI validates a whole file before it sends
anything, and the daemon validates again what it receives.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError
from .options import (
    NAME_PATTERN,
    OPTION_BY_NAME,
    OPTIONS,
    Invalid,
    parse_env,
    quote,
)

if TYPE_CHECKING:
    from .pm2 import Note


@dataclass(frozen=True, slots=True)
class AppSpec:
    """One app, resolved: absolute paths, merged env, instance count as a number."""

    name: str
    script: str
    args: tuple[str, ...]
    interpreter: str | None
    interpreter_args: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]
    instances: int
    exec_mode: str
    listen: tuple[str, ...]
    port: int | None
    reuse_port: bool
    preload: bool
    user: str | None
    group: str | None
    autorestart: bool
    max_restarts: int
    min_uptime_s: float
    restart_delay_s: float
    exp_backoff_restart_delay_s: float
    kill_timeout_s: float
    stop_signal: str
    shutdown_with_message: bool
    wait_ready: bool
    ready_check: str | None
    listen_timeout_s: float
    reload_mode: str
    out_file: str | None
    error_file: str | None
    merge_logs: bool
    log_date_format: str | None
    max_log_size_bytes: int | None
    retain: int
    max_memory_restart_bytes: int | None
    memory_limit_samples: int
    watch: bool | tuple[str, ...] = False
    ignore_watch: tuple[str, ...] = ()
    watch_delay_s: float = 0.5
    cron_restart: str | None = None

    @property
    def is_cluster(self) -> bool:
        return self.exec_mode == "cluster"

    def command(self) -> list[str]:
        """The argv to execute, before {fd}/{port}/{instance} templating of args."""
        interpreter = self.interpreter or default_interpreter(self.script)
        if interpreter == "none":
            return [self.script, *self.args]
        return [interpreter, *self.interpreter_args, self.script, *self.args]

    def to_table(self) -> dict[str, object]:
        """The spec as ecosystem keys: what the CLI sends, describe shows and save writes.

        Durations are written in milliseconds and sizes in bytes, so that parsing the
        table again gives back an equal spec."""
        table: dict[str, object] = {}
        for option in OPTIONS:
            value = getattr(self, option.field)
            if value is None or option.name == "port":
                continue  # "port" is folded into listen
            if option.field.endswith("_s"):
                milliseconds = round(value * 1000, 3)
                value = int(milliseconds) if milliseconds == int(milliseconds) else milliseconds
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            table[option.name] = value
        return table

    def with_instances(self, instances: int) -> AppSpec:
        return dataclasses.replace(self, instances=instances)


def default_interpreter(script: str) -> str:
    """By extension: .py runs with the Python running pmx, .js with node, else directly."""
    if script.endswith(".py"):
        return sys.executable
    if script.endswith((".js", ".mjs", ".cjs")):
        return "node"
    return "none"


# ---------------------------------------------------------------- parsing



def _where(source: str, index: int, name: object) -> str:
    if isinstance(name, str) and name:
        return f"{source}: app {quote(name)} (apps[{index}])"
    return f"{source}: apps[{index}]"


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    text = repr(value) if not isinstance(value, str) else quote(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_app(
    raw: Mapping[str, object],
    *,
    source: str,
    index: int,
    base_dir: Path,
    env_name: str | None = None,
) -> AppSpec:
    """Validate one [[apps]] table. Raises ConfigError naming source, app and key."""
    where = _where(source, index, raw.get("name"))
    values: dict[str, object] = {}
    env_overlays: dict[str, dict[str, str]] = {}
    for key, value in raw.items():
        option = OPTION_BY_NAME.get(key)
        if option is None and key.startswith("env_") and len(key) > 4:
            try:
                env_overlays[key[4:]] = parse_env(value)
            except Invalid as exc:
                found = "" if exc.says_found else f", got {_describe(value)}"
                raise ConfigError(f"{where}: {key} must be {exc}{found}") from None
            continue
        if option is None:
            import difflib  # only for a mistake: not loaded into pmxd otherwise

            close = difflib.get_close_matches(key, [o.name for o in OPTIONS], n=1, cutoff=0.6)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            raise ConfigError(f'{where}: unknown key "{key}"{hint}')
        try:
            values[option.field] = option.parse(value)
        except Invalid as exc:
            found = "" if exc.says_found else f", got {_describe(value)}"
            raise ConfigError(f"{where}: {key} must be {exc}{found}") from None
    for required in ("name", "script"):
        if required not in values:
            raise ConfigError(f'{where}: missing key "{required}" (a non-empty string)')
    name = str(values["name"])
    # A name of digits only is allowed, as in PM2 (its issue #1937): a target is looked
    # up as a name before it is taken for an instance id.
    if not NAME_PATTERN.fullmatch(name) or name == "all":
        raise ConfigError(
            f'{where}: name must be letters, digits and "_.@-" (at most 64, not "all"), '
            f"got {_describe(name)}"
        )
    if env_name is not None and env_name in env_overlays:
        merged = dict(parse_env(values.get("env", {})))
        merged.update(env_overlays[env_name])
        values["env"] = merged

    for option in OPTIONS:
        values.setdefault(option.field, option.default)
    cwd = Path(str(values["cwd"])) if values["cwd"] is not None else Path(".")
    values["cwd"] = str(base_dir / cwd) if not cwd.is_absolute() else str(cwd)
    values["cwd"] = os.path.normpath(str(values["cwd"]))
    script = str(values["script"])
    # A script given as a path is resolved against cwd; a bare command name ("node",
    # "gunicorn") is left for PATH lookup, as a shell would.
    if "/" in script or os.path.exists(os.path.join(str(values["cwd"]), script)):
        values["script"] = os.path.normpath(os.path.join(str(values["cwd"]), script))
    for log_key in ("out_file", "error_file"):
        if values[log_key] is not None:
            values[log_key] = os.path.normpath(os.path.join(str(values["cwd"]), str(values[log_key])))
    _check_cluster(values, where)
    return AppSpec(**values)  # type: ignore[arg-type]


def _check_cluster(values: dict[str, object], where: str) -> None:
    listen = values["listen"]
    assert isinstance(listen, tuple)
    port = values["port"]
    if port is not None:
        if listen:
            raise ConfigError(f'{where}: give either "port" or "listen", not both')
        values["listen"] = (f"0.0.0.0:{port}",)
        values["port"] = None
    if values["exec_mode"] == "cluster" and not values["listen"] and not values["preload"]:
        raise ConfigError(f'{where}: exec_mode "cluster" with preload = false needs "listen" '
                          '(or "port"): without the preloads pmx cannot learn the port')
    if values["exec_mode"] != "cluster" and values["listen"]:
        raise ConfigError(f'{where}: "listen" and "port" need exec_mode = "cluster"')
    if values["exec_mode"] == "cluster" and values["reuse_port"] and not values["listen"]:
        raise ConfigError(f'{where}: reuse_port needs "listen" (or "port")')
    if values["reuse_port"] and any(str(a).startswith("unix:") for a in values["listen"]):  # type: ignore[attr-defined]
        raise ConfigError(f"{where}: reuse_port works with TCP addresses only")


def parse_ecosystem(
    path: str | os.PathLike[str],
    *,
    env_name: str | None = None,
    only: Sequence[str] = (),
    notes: list[Note] | None = None,
) -> list[AppSpec]:
    """Read and validate a whole ecosystem file; every app or none.

    TOML, or PM2's files (ecosystem.config.js/.cjs/.mjs, .json, .yml/.yaml) and
    Procfiles, converted by pm2.py; what the conversion dropped or changed is added to
    `notes`."""
    from . import pm2  # only for the files that are not TOML

    file = Path(path)
    source = str(path)
    if pm2.file_kind(file) != "toml":
        apps, pm2_notes = pm2.load(file, source)
        if notes is not None:
            notes.extend(pm2_notes)
    else:
        apps = _read_toml(file, source)
    base_dir = file.resolve().parent
    specs: list[AppSpec] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(apps):
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: apps[{index}] must be a table")
        spec = parse_app(raw, source=source, index=index, base_dir=base_dir, env_name=env_name)
        if spec.name in seen:
            raise ConfigError(
                f'{_where(source, index, spec.name)}: duplicate name "{spec.name}" '
                f"(also apps[{seen[spec.name]}])"
            )
        seen[spec.name] = index
        specs.append(spec)
    if env_name is not None:
        _check_env_profile(source, env_name, apps)
    missing = [name for name in only if name not in seen]
    if missing:
        raise ConfigError(f'{source}: --only "{missing[0]}": no app of that name in the file')
    return [spec for spec in specs if not only or spec.name in only]


def _read_toml(file: Path, source: str) -> list[dict[str, object]]:
    import tomllib  # here: it loads datetime, which pmxd needs for nothing else

    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    unknown = [key for key in data if key != "apps"]
    if unknown:
        raise ConfigError(f'{source}: unknown top-level key "{unknown[0]}"; expected [[apps]] tables')
    apps = data.get("apps")
    if not isinstance(apps, list) or not apps:
        found = "a single [apps] table; write [[apps]]" if isinstance(apps, dict) else "none"
        raise ConfigError(f"{source}: expected at least one [[apps]] table, found {found}")
    return apps


def _check_env_profile(source: str, env_name: str, apps: list[dict[str, object]]) -> None:
    """`--env NAME` needs an app with env_NAME: a typo must not start the apps without it."""
    known = sorted({key[4:] for raw in apps for key in raw
                    if key.startswith("env_") and len(key) > 4 and key not in OPTION_BY_NAME})
    if env_name not in known:
        listed = ", ".join(known) if known else "none (no app has an env_NAME table)"
        raise ConfigError(f"{source}: no app has env_{env_name}; known: {listed}")


def spec_from_table(table: Mapping[str, object], *, source: str = "request") -> AppSpec:
    """An AppSpec from the resolved table a client sent (paths are already absolute)."""
    return parse_app(table, source=source, index=0, base_dir=Path("/"))


SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "CREDENTIAL", "PRIVATE")
MASK = "********"


def is_secret_name(name: str, markers: Sequence[str] = SECRET_MARKERS) -> bool:
    upper = name.upper()
    return any(marker in upper for marker in markers)


def mask_env(env: Mapping[str, str], markers: Sequence[str] = SECRET_MARKERS) -> dict[str, str]:
    """Env with secret-looking values replaced, for describe, env and --json output."""
    return {name: MASK if is_secret_name(name, markers) else value for name, value in env.items()}
