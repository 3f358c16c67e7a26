"""The ecosystem options: one table, and the parsers of their values. Standard library only,
but for croniter, imported by `parse_cron` when a file has a cron_restart.

Every option is declared once, in OPTIONS: its name (PM2's, so PM2 users feel at home),
the AppSpec field it fills (the field's suffix carries the unit: _s, _bytes), its
parser, its default and its help. That one table drives parsing, validation,
`describe`, the wire format the CLI sends to the daemon and the dump that `pmx save`
writes. A parser raises `Invalid` with what was expected; `config.py` adds the file,
the app and the key.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

EXEC_MODES = ("fork", "cluster")
RELOAD_MODES = ("overlap", "restart")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")

MAX_DURATION_S = 7 * 24 * 3600.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


class Invalid(Exception):
    """Raised by a value parser; the caller adds file, app and key, and what was found
    unless the message already says it (`says_found`)."""

    def __init__(self, expected: str, *, says_found: bool = False) -> None:
        super().__init__(expected)
        self.says_found = says_found



def quote(text: str) -> str:
    """A string in double quotes, escaped, so that an error stays one unambiguous line."""
    return json.dumps(text, ensure_ascii=False)


# ---------------------------------------------------------------- value parsers


def parse_duration_s(value: object) -> float:
    """Milliseconds as an integer, or a string like "500ms", "5s", "2m", "1h" -> seconds."""
    if isinstance(value, bool):
        raise Invalid("a duration like 1600 (ms) or \"5s\"")
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
    raise Invalid("a duration like 1600 (ms) or \"5s\"")


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
    raise Invalid("a size like 314572800 (bytes) or \"300M\"")


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
    raise Invalid("a non-empty string")


def _parse_optional_str(value: object) -> str | None:
    if isinstance(value, str):
        return value or None
    raise Invalid("a string")


def _parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise Invalid("true or false")


def _parse_count(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise Invalid("a whole number, 0 or more")


def _parse_argv(value: object) -> tuple[str, ...]:
    """A list of strings, or one string split the way a shell would split it."""
    import shlex

    if isinstance(value, str) and "\0" not in value:
        try:
            return tuple(shlex.split(value))
        except ValueError as exc:
            raise Invalid(f"arguments a shell could split ({exc})") from None
    if isinstance(value, list) and all(
            isinstance(item, str | int | float) and not isinstance(item, bool)
            and "\0" not in str(item) for item in value):
        return tuple(str(item) for item in value)
    raise Invalid("a list of strings or one string")


def parse_env(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise Invalid("a table of NAME = value")
    env: dict[str, str] = {}
    for name, item in value.items():
        if not name or "=" in name or "\0" in name:
            raise Invalid(f"a table of NAME = value, with names without '=', got {quote(name)}",
                           says_found=True)
        if isinstance(item, bool):
            env[name] = "true" if item else "false"
        elif isinstance(item, str | int | float) and "\0" not in str(item):
            env[name] = str(item)
        else:
            found = "a table" if isinstance(item, dict) else (
                "a list" if isinstance(item, list) else quote(str(item)))
            raise Invalid(f"a string, number or boolean for {name}, got {found}", says_found=True)
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
    raise Invalid('a whole number from 1 to 1024, or "max"')


def _parse_signal(value: object) -> str:
    if isinstance(value, str):
        name = value.upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        if name in ("SIGKILL", "SIGSTOP"):
            raise Invalid(f"a signal the app can handle ({name} cannot be caught; "
                           "SIGKILL comes anyway after kill_timeout)")
        if name in signal.Signals.__members__:
            return name
    raise Invalid('a signal name like "SIGTERM" or "SIGINT"')


def signal_number(value: str) -> int:
    """`pmx signal`'s signal: a name ("SIGUSR2", "usr2") or a number (12); any signal."""
    if value.isascii() and value.isdigit():
        number = int(value)
        if 0 < number < signal.NSIG:
            return number
    else:
        name = value.upper() if value.upper().startswith("SIG") else "SIG" + value.upper()
        if name in signal.Signals.__members__:
            return int(signal.Signals[name])
    raise Invalid(f'a signal name like "SIGUSR2" or a number from 1 to {signal.NSIG - 1}')


def _choice(choices: Sequence[str]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise Invalid(" or ".join(f'"{c}"' for c in choices))

    return parse


def _parse_listen(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if items == []:
        return ()  # what a fork-mode app's table holds
    if not isinstance(items, list):
        raise Invalid('an address like "127.0.0.1:8000", "[::1]:8000" or "unix:/path", or a list')
    addresses = []
    for item in items:
        if not isinstance(item, str):
            raise Invalid('an address like "127.0.0.1:8000" or "unix:/path"')
        try:
            addresses.append(validate_address(item))
        except Invalid as exc:
            raise Invalid(f"{exc}, got {quote(item)}", says_found=True) from None
    return tuple(addresses)


def validate_address(address: str) -> str:
    """Check the shape of a listen address; binding it is the daemon's job."""
    if address.startswith("unix:"):
        if len(address) > 5 and len(address[5:].encode()) < 108:
            return address
        raise Invalid('"unix:" followed by a path shorter than 108 bytes')
    host, sep, port = address.rpartition(":")
    if sep and port.isascii() and port.isdigit() and 0 < int(port) < 65536 and host \
            and " " not in host:
        if host.startswith("[") == host.endswith("]"):
            return address
    raise Invalid('an address like "127.0.0.1:8000", "[::1]:8000" or "unix:/path/app.sock"')


def _parse_port(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536:
        return value
    raise Invalid("a port number from 1 to 65535")


def _parse_ready_check(value: object) -> str:
    if isinstance(value, str) and (
        value.startswith(("http://", "tcp:")) and len(value) > len("tcp:")
    ):
        return value
    raise Invalid('"tcp:HOST:PORT" or "http://HOST:PORT/path" ({port} and {instance} allowed)')


def _parse_watch(value: object) -> bool | tuple[str, ...]:
    """true (the app's cwd), false, a path or a list of paths (relative to the app's cwd)."""
    if isinstance(value, bool):
        return value
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list) and all(isinstance(item, str) and item.strip() and "\0" not in item
                                       for item in items):
        return tuple(str(item) for item in items) if items else False
    raise Invalid("true, false, a path or a list of paths")


def _parse_ignore_watch(value: object) -> tuple[str, ...]:
    """Globs or paths: a list of strings, or one string."""
    items = [value] if isinstance(value, str) else value
    if isinstance(items, list) and all(isinstance(item, str) and item.strip() and "\0" not in item
                                       for item in items):
        return tuple(str(item) for item in items)
    raise Invalid('a glob or path like "*.log" or "tmp", or a list of them')


def parse_cron(value: object) -> str | None:
    """A cron expression, checked with croniter: 5 fields, or 6 with seconds first (as
    PM2's cron library reads them), or @daily and friends; "" or "0" turns it off (PM2)."""
    if isinstance(value, str) and value.strip() in ("", "0"):
        return None
    expected = 'a cron expression like "0 3 * * *" (or 6 fields, seconds first)'
    if not isinstance(value, str) or "\0" in value:
        raise Invalid(expected)
    import datetime

    from croniter import (  # type: ignore[import-untyped]
        CroniterBadDateError,
        CroniterError,
        croniter,
    )

    try:
        croniter(value, datetime.datetime.now(), second_at_beginning=True).get_next(float)
    except CroniterBadDateError:
        raise Invalid(f"{expected}, got {quote(value)}, which never matches a date",
                      says_found=True) from None
    except CroniterError as exc:
        raise Invalid(f"{expected}, got {quote(value)} ({exc})", says_found=True) from None
    return " ".join(value.split())


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
    Option("env", "env", parse_env, {}, "environment variables added for the app"),
    Option("instances", "instances", _parse_instances, 1, 'how many instances; "max" = CPUs'),
    Option("exec_mode", "exec_mode", _choice(EXEC_MODES), "fork",
           '"fork", or "cluster": instances share daemon-owned listening sockets'),
    Option("listen", "listen", _parse_listen, (),
           "cluster mode: addresses the daemon binds (default: learned from the app)"),
    Option("port", "port", _parse_port, None, 'cluster mode: shorthand for listen = "0.0.0.0:PORT"'),
    Option("reuse_port", "reuse_port", _parse_bool, False,
           "cluster mode: one SO_REUSEPORT socket per instance slot"),
    Option("preload", "preload", _parse_bool, True,
           "cluster mode: Node and Python apps that listen on a port themselves share it "
           "through pmx's preloads; false turns them off"),
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
    Option("shutdown_with_message", "shutdown_with_message", _parse_bool, False,
           "Node apps: send the 'shutdown' message (PM2's) instead of the stop signal"),
    Option("wait_ready", "wait_ready", _parse_bool, False,
           "the app says when it is ready: READY=1 on $NOTIFY_SOCKET, or process.send('ready')"),
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
    Option("watch", "watch", _parse_watch, False,
           "reload (no downtime) when a file changes: true watches cwd; or paths under cwd"),
    Option("ignore_watch", "ignore_watch", _parse_ignore_watch, (),
           "globs or paths not to watch (node_modules, .git and pmx's logs always are)"),
    Option("watch_delay", "watch_delay_s", parse_duration_s, 0.5,
           "quiet time after the last change before the reload: a burst gives one reload"),
    Option("cron_restart", "cron_restart", parse_cron, None,
           'reload (no downtime) at these times, local time: "0 3 * * *"'),
)
OPTION_BY_NAME: Mapping[str, Option] = {option.name: option for option in OPTIONS}
