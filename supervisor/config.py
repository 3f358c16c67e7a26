"""Ecosystem TOML -> typed, frozen AppSpec values.  Standard library only.

Every option is declared once, in OPTIONS: its name (PM2's, so PM2 users feel at home),
its kind, its default and its help. That one table drives parsing, validation,
`describe`, the wire format the CLI sends to the daemon and the dump that `pmx save`
writes (which is itself a valid ecosystem file).

Every error is one line naming the file, the app and the key, with what was expected
and what was found:

    ecosystem.toml: app "api" (apps[1]): unknown key "instnaces"; did you mean "instances"?

Nothing here touches a process: the CLI validates a whole file before it sends
anything, and the daemon validates again what it receives.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import signal
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

EXEC_MODES = ("fork", "cluster")
RELOAD_MODES = ("overlap", "restart")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")

MAX_DURATION_S = 7 * 24 * 3600.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


class _Invalid(Exception):
    """Raised by a value parser; the caller adds file, app and key, and what was found
    unless the message already says it (`says_found`)."""

    def __init__(self, expected: str, *, says_found: bool = False) -> None:
        super().__init__(expected)
        self.says_found = says_found


# ---------------------------------------------------------------- value parsers


def parse_duration_s(value: object) -> float:
    """Milliseconds as an integer, or a string like "500ms", "5s", "2m", "1h" -> seconds."""
    if isinstance(value, bool):
        raise _Invalid("a duration like 1600 (ms) or \"5s\"")
    seconds: float | None = None
    if isinstance(value, int | float):
        seconds = float(value) / 1000.0
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match:
            number, unit = float(match.group(1)), match.group(2) or "ms"
            seconds = number * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    if seconds is not None and math.isfinite(seconds) and 0 <= seconds <= MAX_DURATION_S:
        return seconds
    raise _Invalid("a duration like 1600 (ms) or \"5s\"")


def parse_size_bytes(value: object) -> int:
    """Bytes as an integer, or a string like "300M", "1G", "512K" (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
            if size > 0:
                return size
    raise _Invalid("a size like 314572800 (bytes) or \"300M\"")


def format_size(size: int) -> str:
    """Bytes in the largest unit that fits: exact when it divides ("300M"), else rounded
    ("412M"); below 1K, the number of bytes ("512B")."""
    for unit in ("G", "M", "K"):
        factor = _SIZE_UNITS[unit]
        if size >= factor:
            return f"{size // factor}{unit}" if size % factor == 0 else f"{size / factor:.0f}{unit}"
    return f"{size}B"


def _parse_str(value: object) -> str:
    if isinstance(value, str) and value.strip() and "\0" not in value:
        return value
    raise _Invalid("a non-empty string")


def _parse_optional_str(value: object) -> str | None:
    if isinstance(value, str):
        return value or None
    raise _Invalid("a string")


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid("true or false")


def _parse_count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise _Invalid("a whole number, 0 or more")


def _parse_argv(value: object) -> tuple[str, ...]:
    """A list of strings, or one string split the way a shell would split it."""
    import shlex

    if isinstance(value, str) and "\0" not in value:
        try:
            return tuple(shlex.split(value))
        except ValueError as exc:
            raise _Invalid(f"arguments a shell could split ({exc})") from None
    if isinstance(value, list) and all(
            isinstance(item, str | int | float) and not isinstance(item, bool)
            and "\0" not in str(item) for item in value):
        return tuple(str(item) for item in value)
    raise _Invalid("a list of strings or one string")


def _parse_env(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _Invalid("a table of NAME = value")
    env: dict[str, str] = {}
    for name, item in value.items():
        if not name or "=" in name or "\0" in name:
            raise _Invalid(f"a table of NAME = value, with names without '=', got {_quote(name)}",
                           says_found=True)
        if isinstance(item, bool):
            env[name] = "true" if item else "false"
        elif isinstance(item, str | int | float) and "\0" not in str(item):
            env[name] = str(item)
        else:
            found = "a table" if isinstance(item, dict) else (
                "a list" if isinstance(item, list) else _quote(str(item)))
            raise _Invalid(f"a string, number or boolean for {name}, got {found}", says_found=True)
    return env


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity), which is what "max" means."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _parse_instances(value: object) -> int:
    if value == "max":
        return cpu_count()
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1024:
        return value
    raise _Invalid('a whole number from 1 to 1024, or "max"')


def _parse_signal(value: object) -> str:
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        if name in ("SIGKILL", "SIGSTOP"):
            raise _Invalid(f"a signal the app can handle ({name} cannot be caught; "
                           "SIGKILL comes anyway after kill_timeout)")
        if name in signal.Signals.__members__:
            return name
    raise _Invalid('a signal name like "SIGTERM" or "SIGINT"')


def _choice(choices: Sequence[str]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise _Invalid(" or ".join(f'"{c}"' for c in choices))

    return parse


def _parse_listen(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if items == []:
        return ()  # what a fork-mode app's table holds
    if not isinstance(items, list):
        raise _Invalid('an address like "127.0.0.1:8000", "[::1]:8000" or "unix:/path", or a list')
    addresses = []
    for item in items:
        if not isinstance(item, str):
            raise _Invalid('an address like "127.0.0.1:8000" or "unix:/path"')
        try:
            addresses.append(validate_address(item))
        except _Invalid as exc:
            raise _Invalid(f"{exc}, got {_quote(item)}", says_found=True) from None
    return tuple(addresses)


def validate_address(address: str) -> str:
    """Check the shape of a listen address; binding it is the daemon's job."""
    if address.startswith("unix:"):
        if len(address) > 5 and len(address[5:].encode()) < 108:
            return address
        raise _Invalid('"unix:" followed by a path shorter than 108 bytes')
    host, sep, port = address.rpartition(":")
    if sep and port.isascii() and port.isdigit() and 0 < int(port) < 65536 and host \
            and " " not in host:
        if host.startswith("[") == host.endswith("]"):
            return address
    raise _Invalid('an address like "127.0.0.1:8000", "[::1]:8000" or "unix:/path/app.sock"')


def _parse_port(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    raise _Invalid("a port number from 1 to 65535")


def _parse_ready_check(value: object) -> str:
    if isinstance(value, str) and (
        value.startswith(("http://", "tcp:")) and len(value) > len("tcp:")
    ):
        return value
    raise _Invalid('"tcp:HOST:PORT" or "http://HOST:PORT/path" ({port} and {instance} allowed)')


# ---------------------------------------------------------------- the option table


@dataclass(frozen=True, slots=True)
class Option:
    name: str  # the key in the ecosystem file
    field: str  # the AppSpec attribute (carries the unit: _s, _bytes)
    parse: Callable[[object], object]
    default: object
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("name", "name", _parse_str, None, "unique name of the app"),
    Option("script", "script", _parse_str, None, "the program or script to run"),
    Option("args", "args", _parse_argv, (), "arguments; {fd}, {port}, {instance} are replaced"),
    Option("interpreter", "interpreter", _parse_optional_str, None,
           'program that runs the script; by extension by default; "none" runs it directly'),
    Option("interpreter_args", "interpreter_args", _parse_argv, (), "arguments for the interpreter"),
    Option("cwd", "cwd", _parse_str, None, "working directory, relative to the ecosystem file"),
    Option("env", "env", _parse_env, {}, "environment variables added for the app"),
    Option("instances", "instances", _parse_instances, 1, 'how many instances; "max" = CPUs'),
    Option("exec_mode", "exec_mode", _choice(EXEC_MODES), "fork",
           '"fork", or "cluster": instances share daemon-owned listening sockets'),
    Option("listen", "listen", _parse_listen, (), "cluster mode: addresses the daemon binds"),
    Option("port", "port", _parse_port, None, 'cluster mode: shorthand for listen = "0.0.0.0:PORT"'),
    Option("reuse_port", "reuse_port", _parse_bool, False,
           "cluster mode: one SO_REUSEPORT socket per instance slot"),
    Option("user", "user", _parse_optional_str, None,
           "run the app as this user (pmxd must run as root); HOME and USER follow"),
    Option("group", "group", _parse_optional_str, None,
           "run the app with this group (default: the user's own group)"),
    Option("autorestart", "autorestart", _parse_bool, True, "restart the app when it exits"),
    Option("max_restarts", "max_restarts", _parse_count, 16,
           "unstable restarts in a row before the app is errored"),
    Option("min_uptime", "min_uptime_s", parse_duration_s, 1.0,
           "an exit sooner than this after start counts as unstable"),
    Option("restart_delay", "restart_delay_s", parse_duration_s, 0.0, "wait before a restart"),
    Option("exp_backoff_restart_delay", "exp_backoff_restart_delay_s", parse_duration_s, 0.0,
           "first delay of an exponential back-off (x1.5 per unstable restart, capped at 15s)"),
    Option("kill_timeout", "kill_timeout_s", parse_duration_s, 5.0,
           "time between the stop signal and SIGKILL of the process group"),
    Option("stop_signal", "stop_signal", _parse_signal, "SIGTERM", "signal asking the app to stop"),
    Option("wait_ready", "wait_ready", _parse_bool, False,
           "the app says READY=1 on $NOTIFY_SOCKET (systemd's notify protocol) when ready"),
    Option("ready_check", "ready_check", _parse_ready_check, None,
           'ready when "tcp:HOST:PORT" connects or "http://..." answers 2xx/3xx'),
    Option("listen_timeout", "listen_timeout_s", parse_duration_s, 3.0,
           "how long a new instance may take to become ready (or must stay up, without checks)"),
    Option("reload_mode", "reload_mode", _choice(RELOAD_MODES), "overlap",
           '"overlap": start new, then stop old; "restart": stop, then start'),
    Option("out_file", "out_file", _parse_optional_str, None, "stdout log file"),
    Option("error_file", "error_file", _parse_optional_str, None, "stderr log file"),
    Option("merge_logs", "merge_logs", _parse_bool, False, "one log file for all instances"),
    Option("log_date_format", "log_date_format", _parse_optional_str, None,
           'strftime prefix for each log line, like "%Y-%m-%d %H:%M:%S"'),
    Option("max_log_size", "max_log_size_bytes", parse_size_bytes, None,
           "rotate a log file when it grows past this size"),
    Option("retain", "retain", _parse_count, 5, "rotated log files kept"),
    Option("max_memory_restart", "max_memory_restart_bytes", parse_size_bytes, None,
           "restart an instance whose process tree uses more resident memory"),
    Option("memory_limit_samples", "memory_limit_samples", _parse_count, 1,
           "samples in a row above max_memory_restart before the restart"),
)
OPTION_BY_NAME: Mapping[str, Option] = {option.name: option for option in OPTIONS}


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
    user: str | None
    group: str | None
    autorestart: bool
    max_restarts: int
    min_uptime_s: float
    restart_delay_s: float
    exp_backoff_restart_delay_s: float
    kill_timeout_s: float
    stop_signal: str
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


def _quote(text: str) -> str:
    """A string in double quotes, escaped, so that an error stays one unambiguous line."""
    return json.dumps(text, ensure_ascii=False)


def _where(source: str, index: int, name: object) -> str:
    if isinstance(name, str) and name:
        return f"{source}: app {_quote(name)} (apps[{index}])"
    return f"{source}: apps[{index}]"


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    text = repr(value) if not isinstance(value, str) else _quote(value)
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
                env_overlays[key[4:]] = _parse_env(value)
            except _Invalid as exc:
                found = "" if exc.says_found else f", got {_describe(value)}"
                raise ConfigError(f"{where}: {key} must be {exc}{found}") from None
            continue
        if option is None:
            close = difflib.get_close_matches(key, [o.name for o in OPTIONS], n=1, cutoff=0.6)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            raise ConfigError(f'{where}: unknown key "{key}"{hint}')
        try:
            values[option.field] = option.parse(value)
        except _Invalid as exc:
            found = "" if exc.says_found else f", got {_describe(value)}"
            raise ConfigError(f"{where}: {key} must be {exc}{found}") from None
    for required in ("name", "script"):
        if required not in values:
            raise ConfigError(f'{where}: missing key "{required}" (a non-empty string)')
    name = str(values["name"])
    if not NAME_PATTERN.fullmatch(name) or name == "all" or name.isdigit():
        raise ConfigError(
            f'{where}: name must be letters, digits and "_.@-" (at most 64, not "all" '
            f"and not a number), got {_describe(name)}"
        )
    if env_name is not None and env_name in env_overlays:
        merged = dict(_parse_env(values.get("env", {})))
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
    if values["exec_mode"] == "cluster" and not values["listen"]:
        raise ConfigError(f'{where}: exec_mode "cluster" needs "listen" (or "port")')
    if values["exec_mode"] != "cluster" and values["listen"]:
        raise ConfigError(f'{where}: "listen" and "port" need exec_mode = "cluster"')
    if values["reuse_port"] and any(str(a).startswith("unix:") for a in values["listen"]):  # type: ignore[attr-defined]
        raise ConfigError(f"{where}: reuse_port works with TCP addresses only")


def parse_ecosystem(
    path: str | os.PathLike[str],
    *,
    env_name: str | None = None,
    only: Sequence[str] = (),
) -> list[AppSpec]:
    """Read and validate a whole ecosystem file; every app or none."""
    file = Path(path)
    source = str(path)
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
    missing = [name for name in only if name not in seen]
    if missing:
        raise ConfigError(f'{source}: --only "{missing[0]}": no app of that name in the file')
    return [spec for spec in specs if not only or spec.name in only]


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
