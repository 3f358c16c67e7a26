"""pmxd's command line: its arguments, detaching into the background, its log, `main`.

The files named on the command line are read and checked first, so that a bad one is one
line on stderr and exit 2 before anything starts; then the home is prepared and locked,
and daemon.py's `Daemon` runs until it is stopped. pmxd.py calls `main` once it has kept
ssl out of the process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from . import __version__
from .config import parse_ecosystem
from .daemon import Daemon
from .errors import ConfigError, ExitCode, HomeError
from .home import DAEMON_LOG, HomeLock, default_home, open_private_log, prepare_home

log = logging.getLogger("pmx.supervisor")

DEFAULT_MONITOR_INTERVAL_S = 1.0
RUNTIME_PROG = "pmx-runtime"



def _setup_logging(home: Path, foreground: bool) -> None:
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.StreamHandler(open_private_log(home / DAEMON_LOG))  # no symlink
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    runtime = prog == RUNTIME_PROG  # --foreground --runtime are implied: not shown
    parser = argparse.ArgumentParser(prog=prog, description=(
        "pmxd in the foreground as a container's entry point: runs the files' apps, logs to "
        "stderr, exits when every app has ended" if runtime else "the pmx daemon"))
    parser.add_argument("files", nargs="*", help="ecosystem files to start")
    parser.add_argument("--home", help="PMX_HOME (default: $PMX_HOME or ~/.pmx)")
    parser.add_argument("--foreground", action="store_true", help=argparse.SUPPRESS if runtime
                        else "stay attached and log to stderr (for systemd and containers)")
    parser.add_argument("--resurrect", action="store_true",
                        help="start the apps of the last `pmx save`")
    parser.add_argument("--env", dest="env_name", help="env_NAME table of the files to use")
    parser.add_argument("--monitor-interval", type=float, default=None,
                        help="seconds between CPU/memory samples (default 1, at least 0.1)")
    parser.add_argument("--log-file", action="store_true",
                        help="with --foreground: log to PMX_HOME/pmxd.log, not stderr")
    parser.add_argument("--runtime", action="store_true", help=argparse.SUPPRESS if runtime
                        else "container mode: app output to stdout, exit when every app ended")
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    return parser.parse_args(argv)


def _detach() -> int | None:
    """Fork into the background. The parent waits until the child says "ok" on a pipe (or
    why it cannot start) and exits with that outcome; the child gets the pipe's write end,
    so `pmxd` returns only once the daemon is usable. Returns None in the parent's stead."""
    read_end, ready_fd = os.pipe()
    if os.fork() != 0:
        os.close(ready_fd)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message == "ok":
            os._exit(int(ExitCode.OK))
        print(f"pmxd: {message or 'the daemon exited during start-up; see its log'}",
              file=sys.stderr, flush=True)
        os._exit(int(ExitCode.FAILED))
    os.close(read_end)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    return ready_fd


def unignore_signals() -> None:
    """Signals ignored by whoever started pmxd (`pmxd &`, nohup) would stay ignored in every
    app, since exec keeps SIG_IGN: an app could then never get SIGINT or SIGQUIT as its stop
    signal. A no-op handler instead keeps pmxd itself immune until the loop's handlers are
    in place, and exec resets it to the default in the children."""
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM,
                   signal.SIGUSR1, signal.SIGUSR2):
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, lambda number, frame: None)


def close_inherited_on_exec() -> None:
    """Files whoever started pmxd left open (a shell's, a service manager's; during `pmx
    update`, the previous image's, which the new one adopts by number) become close-on-
    exec: most apps are spawned through posix_spawn (spawn.py), which closes nothing else,
    and an app must get none of pmxd's files but those spawn.py gives it."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except (OSError, ValueError):
        return  # no /proc to list them (not Linux)
    for fd in fds:
        if fd > 2:
            with contextlib.suppress(OSError):  # the listing's own fd, closed by now
                os.set_inheritable(fd, False)


def main(argv: list[str] | None = None, *, prog: str = "pmxd") -> int:
    """pmxd's command line. The files are read and checked first, so that a missing or
    invalid one is one line on stderr and exit 2, before anything starts."""
    args = _parse_args(argv, prog)
    try:
        files = [parse_ecosystem(file, env_name=args.env_name) for file in args.files]
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    unignore_signals()
    close_inherited_on_exec()
    home = Path(os.path.abspath(Path(args.home) if args.home else default_home()))
    os.umask(0o077)
    interval = args.monitor_interval or float(os.environ.get("PMX_MONITOR_INTERVAL", "0") or 0) \
        or DEFAULT_MONITOR_INTERVAL_S
    interval = max(0.1, interval)
    ready_fd = None if args.foreground else _detach()
    try:
        prepare_home(home)
        _setup_logging(home, args.foreground and not args.log_file)  # a planted pmxd.log: refused
        lock = HomeLock(home)
        lock.acquire()
    except (HomeError, OSError) as exc:  # OSError: a full disk, a read-only mount
        message = str(exc) if isinstance(exc, HomeError) else (
            f"cannot prepare {home}: {exc.strerror}" + (f" ({exc.filename})" if exc.filename else ""))
        if ready_fd is not None:
            os.write(ready_fd, message.encode())
            os._exit(int(ExitCode.FAILED))
        print(f"{prog}: {message}", file=sys.stderr)
        return int(ExitCode.FAILED)
    errors: list[str] = []
    try:
        async def amain() -> int:
            # Files on a foreground command line mean a container's entry point.
            runtime_mode = args.runtime or bool(args.foreground and args.files)
            daemon = Daemon(home, monitor_interval_s=interval, runtime_mode=runtime_mode,
                            log_to_file=not (args.foreground and not args.log_file))
            status = await daemon.run(resurrect=args.resurrect, files=files, ready_fd=ready_fd)
            errors.extend(daemon.startup_errors)
            return status

        status = asyncio.run(amain())
    except Exception as exc:
        log.exception("pmxd crashed")
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, f"start-up failed: {exc}".encode())
        return int(ExitCode.FAILED)
    finally:
        lock.release()
    for error in errors if ready_fd is None else ():  # else the waiting parent said it
        print(f"{prog}: {error}", file=sys.stderr)
    return status


def runtime_main() -> int:
    """`pmx-runtime FILE...`: pmxd in the foreground as a container's PID 1."""
    return main(["--foreground", "--runtime", *sys.argv[1:]], prog=RUNTIME_PROG)
