"""Spawning one app process: its argv and environment, credentials, inherited sockets.

`spawn()` is the only place pmx creates an app's process. The process gets:
- its own session and process group (so stopping it can kill everything it left there),
- stdin from /dev/null, stdout and stderr on two pipes that pmxd reads,
- only fds 0-2, plus the app's listening sockets from fd 3 on in cluster mode,
- the app's env over pmxd's base env, plus the PM2-compatible identity variables and a
  unique PMX_RUN_ID that marks it and every process it starts (so escapees can be found).

Two kinds of spawn need a step in the child before the program runs, and subprocess
offers none (a pre-exec hook is unsafe in a threaded pmxd):
- cluster sockets sit at fds 3.. in the child, and subprocess keeps fds at their own
  numbers only;
- where pmxd gives each process a cgroup (cgroups.py), the process enters it before the
  program runs, so that nothing the program forks starts outside it.
Such a spawn goes through `os.posix_spawn`, whose file actions move the fds, into a
one-line /bin/sh (`_spawn_through_sh`) that enters the cgroup (writing its own pid to
`cgroup.procs`), changes to the app's directory, sets LISTEN_PID to its own pid (which
exec keeps; systemd's protocol wants the child's pid there) and execs the app: about a
millisecond, where a Python shim cost a whole interpreter start. sh runs a file that
execve refuses (ENOEXEC) as a shell script, so for the cgroup alone the shim is used only
for a file execve runs for certain (exec_format.py); anything else goes through
subprocess, whose execve error is the spawn's error, and is moved into its cgroup after.
So does an app whose environment sh would not pass on unchanged (a name that is not a
shell identifier), and every app where there is no /bin/sh. An app run as another user
needs setuid/setgroups, which posix_spawn cannot do: the shim, still root, enters the
cgroup and execs util-linux's `setpriv`, which becomes the user and execs the app; where
there is no setpriv (or pmxd is not root) it goes through subprocess, with the Python
shim (`_EXEC_SHIM`) when it has sockets to move.
"""

from __future__ import annotations

import errno
import functools
import grp
import itertools
import os
import pwd
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import AppSpec
from .errors import SpawnError
from .exec_format import execve_runs_it, interpreter_of
from .home import fd_reserve

_run_ids = itertools.count(1)
# A `pmx update` keeps the pid: this image's token keeps its run ids apart from those of
# the processes it adopted from the previous one.
_IMAGE = os.urandom(3).hex()


def is_this_images_run(run_id: object) -> bool:
    """Whether PMX_RUN_ID `run_id` is of a process this pmxd image spawned (no leftover of
    a previous pmxd, whatever the files say)."""
    return isinstance(run_id, str) and run_id.startswith(f"{os.getpid()}.{_IMAGE}.")


_EXEC_SHIM = """\
import fcntl, os, sys
count = int(sys.argv[1])
sources = [int(fd) for fd in sys.argv[2:2 + count]]
argv = sys.argv[2 + count:]
floor = max(sources + [2 + count]) + 1
moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, floor) for fd in sources]
for fd in sources:
    os.close(fd)
for slot, fd in enumerate(moved):
    os.dup2(fd, 3 + slot)
    os.close(fd)
if "LISTEN_FDS" in os.environ:
    os.environ["LISTEN_PID"] = str(os.getpid())
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    sys.stderr.write(f"pmx: cannot execute {argv[0]}: {exc.strerror}\\n")
    os._exit(127)
"""

# The sh shim's parts; its arguments: the cgroup's cgroup.procs (if any), the app's
# directory, the app's argv. The fds are already in place. Exit 125: the process could
# not enter its cgroup, and the program did not run (it would run untracked).
# Quoted: a /bin/sh that took IFS from the app's env (dash does not) could split $$.
_SH_ENTER_CGROUP = ('echo "$$" >"$1" || { echo "pmx: not started: cannot enter its cgroup '
                    '($1)" >&2; exit 125; }; shift; ')
_SH_CD = 'cd "$1" || exit 127; shift; unset OLDPWD; '
_SH = "/bin/sh"
_SH_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SH_LISTEN_PID = "LISTEN_PID=$$; export LISTEN_PID; "
_SH_EXEC = 'exec "$@"'

_RESTORED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGPIPE", "SIGXFZ", "SIGXFSZ")
                          if hasattr(signal, name))

# Inherited from pmxd's own environment, but meaningless (or harmful) for an app.
_STALE_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "PMX_LISTEN_FD", "NOTIFY_SOCKET")


@dataclass(frozen=True, slots=True)
class Inheritance:
    """What a cluster instance gets beyond its app's settings: the listening sockets
    (from fd 3 on, with their names), the preload's variables (see dropin.py), and
    whether it wants Node's IPC channel."""

    fds: Sequence[int]
    names: Sequence[str]
    port: int | None
    env: Mapping[str, str] = field(default_factory=dict)
    node_channel: bool = False


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the process is, for its environment: PM2's variables and pmx's own."""

    app: str
    index: int
    instance_id: int


@dataclass(slots=True)
class Spawned:
    pid: int
    popen: subprocess.Popen[bytes] | None  # None when spawned by posix_spawn
    stdout_fd: int
    stderr_fd: int
    run_id: str
    argv: list[str]
    in_cgroup: bool = False  # it entered the cgroup it was given itself, before its program


@dataclass(frozen=True, slots=True)
class Credentials:
    uid: int | None = None
    gid: int | None = None
    groups: list[int] | None = None


def command_and_env(spec: AppSpec, who: Identity, base_env: Mapping[str, str],
                    inheritance: Inheritance | None, notify_socket: str | None,
                    run_id: str, channel_fd: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The argv (with {fd}, {port} and {instance} replaced) and the full environment."""
    values = {"instance": str(who.index), "fd": "3", "port": ""}
    if inheritance is not None and inheritance.port is not None:
        values["port"] = str(inheritance.port)
    argv = [_template(arg, values) for arg in spec.command()]
    env = dict(base_env)
    env.update(spec.env)
    if "PMX_HOME" in base_env:  # the home's marker (daemon.py): an app's env cannot hide it
        env["PMX_HOME"] = base_env["PMX_HOME"]
    env.update({
        "PMX_APP_NAME": spec.name, "PMX_ID": str(who.instance_id), "PMX_INSTANCE": str(who.index),
        "NODE_APP_INSTANCE": str(who.index), "pm_id": str(who.instance_id), "name": spec.name,
        "PMX_RUN_ID": run_id,
    })
    for stale in _STALE_VARIABLES:
        env.pop(stale, None)
    if inheritance is not None:
        env.update(inheritance.env)
    if channel_fd is not None:
        env.update({"NODE_CHANNEL_FD": str(channel_fd), "NODE_CHANNEL_SERIALIZATION_MODE": "json"})
    if inheritance is not None and inheritance.fds:
        env["PMX_LISTEN_FD"] = "3"
        # An app told its fd by argument ({fd}) gets no socket-activation variables:
        # servers such as gunicorn adopt LISTEN_FDS by themselves, close the fd, and
        # would then fail on --bind fd://3.
        if not any("{fd}" in arg for arg in spec.args):
            env.update({"LISTEN_FDS": str(len(inheritance.fds)),
                        "LISTEN_FDNAMES": ":".join(inheritance.names)})
        if inheritance.port is not None:
            env["PORT"] = str(inheritance.port)
    if notify_socket is not None:
        env["NOTIFY_SOCKET"] = notify_socket
    return argv, env


def spawn(spec: AppSpec, who: Identity, base_env: Mapping[str, str],
          inheritance: Inheritance | None, notify_socket: str | None,
          channel_fd: int | None = None, cgroup: Path | None = None,
          before_popen: Callable[[], None] = lambda: None) -> Spawned:
    """Start the process. Raises SpawnError with a one-line reason; leaks no fd.

    `cgroup`: an empty cgroup for the process, which it enters itself where the sh shim
    can run it (then `in_cgroup`); otherwise `before_popen` runs right before the spawn
    and the caller moves the process in right after (cgroups.py: `prepare`, `enter`).
    `channel_fd` (Node's IPC channel) lands after the sockets (at fd 3 + their number)
    when the shim moves fds, else at its own number."""
    run_id = f"{os.getpid()}.{_IMAGE}.{next(_run_ids)}"
    socket_fds = tuple(inheritance.fds) if inheritance is not None else ()
    argv, env = command_and_env(spec, who, base_env, inheritance, notify_socket, run_id,
                                channel_fd)
    if not os.path.isdir(spec.cwd):
        raise SpawnError(f'cannot start app "{spec.name}": cwd {spec.cwd} is not a directory')
    argv[0] = _executable(spec.name, argv[0], env)
    _check_fd_headroom(spec.name, 5 + len(socket_fds))
    credentials = _credentials(spec, env)
    # The app's directory, as a shell would say it (sh's `cd` sets it; Popen keeps whatever
    # the environment said, most often the directory `pmx start` ran in): the same either way.
    if "PWD" not in spec.env:
        env["PWD"] = spec.cwd
    env.pop("OLDPWD", None)
    # As another user, the shim drops to it with setpriv once in its cgroup (as root).
    drop = _setpriv_argv(credentials) if credentials != Credentials() \
        and _may_execute(argv[0], credentials) else []
    through_sh = (credentials == Credentials() or bool(drop)) and _sh_keeps(env) and (
        bool(socket_fds) or (cgroup is not None and execve_runs_it(argv[0], spec.cwd)))
    moved = socket_fds + ((channel_fd,) if channel_fd is not None and (socket_fds or through_sh)
                          else ())
    if channel_fd is not None and moved:
        env["NODE_CHANNEL_FD"] = str(3 + len(socket_fds))  # where the shim puts it
    shown = list(argv)
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        if through_sh:
            procs = cgroup / "cgroup.procs" if cgroup is not None else None
            pid = _spawn_through_sh([*drop, *argv], env, spec.cwd, moved, out_write, err_write,
                                    procs)
            return Spawned(pid, None, out_read, err_read, run_id, shown, procs is not None)
        if moved:
            argv = [sys.executable, "-I", "-S", "-c", _EXEC_SHIM, str(len(moved)),
                    *map(str, moved), *argv]
        if cgroup is not None:
            before_popen()
        popen = subprocess.Popen(
            argv, cwd=spec.cwd, env=env, stdin=subprocess.DEVNULL, stdout=out_write,
            stderr=err_write, close_fds=True,
            pass_fds=moved or ((channel_fd,) if channel_fd is not None else ()),
            start_new_session=True,
            user=credentials.uid, group=credentials.gid, extra_groups=credentials.groups,
        )
        return Spawned(popen.pid, popen, out_read, err_read, run_id, shown)
    except OSError as exc:
        for fd in (out_read, err_read):
            os.close(fd)
        why = exc.strerror or str(exc)
        interpreter = interpreter_of(shown[0]) if exc.errno == errno.ENOENT else None
        if interpreter is not None:  # the kernel's ENOENT names the script, not what is missing
            why = f"its #! interpreter {interpreter} is not there"
        raise SpawnError(f'cannot start app "{spec.name}": {shown[0]}: {why}') from None
    finally:
        os.close(out_write)
        os.close(err_write)


def _spawn_through_sh(argv: list[str], env: Mapping[str, str], cwd: str, moved: Sequence[int],
                      out_write: int, err_write: int, cgroup_procs: Path | None) -> int:
    """posix_spawn into the sh shim with `moved` at fds 3, 4, ... and a new session.

    Every other fd of pmxd is close-on-exec (Python's default), so none leaks. The
    sources first go above every number involved, so that moving one to its slot never
    overwrites another still to be moved."""
    floor = max(*moved, out_write, err_write, 2 + len(moved)) + 1
    actions: list[tuple[object, ...]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out_write, 1),
        (os.POSIX_SPAWN_DUP2, err_write, 2),
    ]
    actions += [(os.POSIX_SPAWN_DUP2, fd, floor + slot) for slot, fd in enumerate(moved)]
    actions += [(os.POSIX_SPAWN_DUP2, floor + slot, 3 + slot) for slot in range(len(moved))]
    actions += [(os.POSIX_SPAWN_CLOSE, floor + slot) for slot in range(len(moved))]
    script = ((_SH_ENTER_CGROUP if cgroup_procs is not None else "") + _SH_CD
              + (_SH_LISTEN_PID if "LISTEN_FDS" in env else "") + _SH_EXEC)
    entering = [str(cgroup_procs)] if cgroup_procs is not None else []
    # What Popen's restore_signals does: pmxd (Python) ignores SIGPIPE and SIGXFSZ, and an
    # ignored signal stays ignored across exec; the app gets them at their defaults.
    return os.posix_spawn(_SH, ["sh", "-c", script, "pmx-shim", *entering, cwd, *argv],
                          env, file_actions=actions, setsid=True, setsigdef=_RESTORED_SIGNALS)


def _setpriv_argv(credentials: Credentials) -> list[str]:
    """util-linux's setpriv becoming `credentials` (user, group, exactly its supplementary
    groups: what Popen(user=, group=, extra_groups=) does) before it execs the app; [] where
    pmxd is not root or there is no trustworthy setpriv."""
    setpriv = _trusted_setpriv()
    if os.getuid() != 0 or credentials.uid is None or credentials.gid is None or not setpriv:
        return []
    groups = (f"--groups={','.join(map(str, credentials.groups))}" if credentials.groups
              else "--clear-groups")
    return [setpriv, f"--reuid={credentials.uid}", f"--regid={credentials.gid}", groups, "--"]


@functools.cache
def _trusted_setpriv() -> str:
    """setpriv's path if root owns it and nobody else may write it; "" when there is none."""
    return next((path for path in ("/usr/bin/setpriv", "/bin/setpriv")
                 if _owned_by_root(path)), "")


def _may_execute(path: str, credentials: Credentials) -> bool:
    """Whether `credentials` may execute `path` by its mode bits (else Popen's execve as
    that user says why, at once, where setpriv would exit 127)."""
    try:
        info = os.stat(path)
    except OSError:
        return False
    if info.st_uid == credentials.uid:
        return bool(info.st_mode & 0o100)
    if info.st_gid == credentials.gid or info.st_gid in (credentials.groups or ()):
        return bool(info.st_mode & 0o010)
    return bool(info.st_mode & 0o001)


def _owned_by_root(path: str) -> bool:
    try:
        info = os.stat(path)
    except OSError:
        return False
    return info.st_uid == 0 and not info.st_mode & 0o022 and os.access(path, os.X_OK)


def _sh_keeps(env: Mapping[str, str]) -> bool:
    """Whether the sh shim can pass `env` to the app unchanged: there is a /bin/sh (not in
    a distroless image), and every name is a shell identifier (dash drops the others,
    such as Spring's `spring.profiles.active`). Else subprocess spawns, with the Python
    shim where sockets must move."""
    return _sh_present() and all(_SH_NAME.match(name) for name in env)


@functools.cache
def _sh_present() -> bool:
    return os.access(_SH, os.X_OK)


def _executable(app: str, program: str, env: Mapping[str, str]) -> str:
    executable = _which(program, env.get("PATH", os.defpath)) if "/" not in program else program
    if executable is None or not os.access(executable, os.X_OK) or os.path.isdir(executable):
        why = "not found" if executable is None or not os.path.exists(executable) else (
            "permission denied (not executable)")
        raise SpawnError(f'cannot start app "{app}": {program}: {why}')
    return executable


def _which(program: str, path: str) -> str | None:
    """shutil.which for a bare name (shutil would load bz2 and lzma into pmxd for this)."""
    for folder in path.split(os.pathsep):
        candidate = os.path.join(folder or os.curdir, program)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


class _FdCount:
    """How many fds pmxd has open, for the headroom check, without listing /proc/self/fd
    on every spawn (at 1,000 instances that list has 4,000 entries). A count is an upper
    bound for the next spawns: each adds at most FDS_PER_SPAWN; it is taken again only
    when that bound comes near the limit."""

    FDS_PER_SPAWN = 8  # pipes, pidfd, channel, the sampler's /proc files, with margin

    def __init__(self) -> None:
        self._counted = 0
        self._spawns_since = 1 << 30  # count on first use

    def upper_bound(self, limit: int, reserve: int) -> int:
        bound = self._counted + self._spawns_since * self.FDS_PER_SPAWN
        if bound + reserve * 2 >= limit:
            self._counted, self._spawns_since = len(os.listdir("/proc/self/fd")), 0
        self._spawns_since += 1
        return self._counted + (self._spawns_since - 1) * self.FDS_PER_SPAWN


_fd_count = _FdCount()


def _check_fd_headroom(app: str, needed: int) -> None:
    """Refuse a spawn that would eat into the reserve of file descriptors."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        return
    reserve = fd_reserve(limit)  # pmxd's own spare and its client slots (home.py)
    in_use = _fd_count.upper_bound(limit, reserve)
    if in_use + needed > limit - reserve:
        in_use = len(os.listdir("/proc/self/fd"))  # the bound is rough: make sure
        if in_use + needed > limit - reserve:
            raise SpawnError(f'cannot start app "{app}": pmxd is near its open-file limit '
                             f"({in_use} of {limit} file descriptors in use, {reserve} kept "
                             "in reserve); raise LimitNOFILE / ulimit -n")


def _credentials(spec: AppSpec, env: dict[str, str]) -> Credentials:
    """Popen arguments for `user`/`group`, and the user's HOME, USER and LOGNAME.

    Popen(user=...) alone would keep pmxd's group and supplementary groups (root's 0),
    so the gid and the exact supplementary groups of the user are passed as well."""
    if spec.user is None and spec.group is None:
        return Credentials()
    try:
        account = pwd.getpwnam(spec.user) if spec.user else pwd.getpwuid(os.getuid())
        gid = grp.getgrnam(spec.group).gr_gid if spec.group else account.pw_gid
    except KeyError as exc:
        raise SpawnError(f'cannot start app "{spec.name}": no such user or group '
                         f"{exc.args[0]}") from None
    if os.getuid() != 0 and (account.pw_uid != os.getuid() or gid != os.getgid()):
        raise SpawnError(f'cannot start app "{spec.name}" as {account.pw_name}: pmxd does '
                         "not run as root")
    env.update({"HOME": account.pw_dir, "USER": account.pw_name, "LOGNAME": account.pw_name})
    return Credentials(account.pw_uid, gid, os.getgrouplist(account.pw_name, gid))


def _template(arg: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg
