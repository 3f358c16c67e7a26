"""Opening, creating, rotating and truncating files so that nothing planted in pmxd's way
is written through: the only way pmxd (often root) touches an app's log file or a file of
its own home.

The rules (issue 16 item 1):

- A file is never opened, created, truncated or renamed through a symlink: the last
  component is opened with O_NOFOLLOW relative to a directory fd (`dir_fd=`), so no
  component can be swapped between a check and its use. O_NONBLOCK keeps a planted FIFO
  from hanging the daemon, and what was opened must be a regular file (or, in a directory
  only pmxd's user can change, a character device such as /dev/null). New files are made
  with O_CREAT|O_EXCL and get their mode with fchmod, whatever the umask; directories pmxd
  makes are 0700 the same way. Truncation is ftruncate on a descriptor opened so, never a
  path; rotation renames with renameat inside the directory fd.
- The directory is reached by walking from / one component at a time (`_walk`). A
  directory is *safe* when it belongs to root or pmxd's user and no one else can write in
  it (group-writable only by root's group, or by pmxd's own group when it has no other
  member). A symlink on the way is followed only when it sits in a safe directory, where
  only root or pmxd's user could have put it. A sticky directory (/tmp) is safe for the
  entries root or pmxd's user owns; a file there must be ours and not hard-linked.
- In a directory someone else can write (an app user's home), pmxd itself does nothing.
  When pmxd is root and the app runs as another `user`, the whole operation (makedirs,
  rename chain, open) is done with that user's credentials by a short-lived forked child
  (`_as_user`) that passes the descriptor back over a socketpair (SCM_RIGHTS): the file
  is the user's, as if the app had written it, and nothing is reachable that the app
  could not write itself. Otherwise `UnsafeFolder` says which directory and who can
  write it, and the caller refuses.

The child costs about a millisecond of the loop once per open, rotation or flush of such
a file, never per line. Files of PMX_HOME (the dump's and state's temporaries) use
`create_new`. Callers: logs.py (LogFile, LogFiles.flush), dump.py, recovery.py.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import signal
import socket
import stat
from dataclasses import dataclass

OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_MODE = 0o600
DIR_MODE = 0o700
MAX_SYMLINKS = 40  # the kernel's own limit
HELPER_TIMEOUT_S = 10.0  # a child stuck on a dead NFS mount is killed


class UnsafePath(OSError):
    """pmxd will not touch this path itself; `strerror` says why in one sentence."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EPERM, message)


class UnsafeFolder(UnsafePath):
    """A folder on the way can be changed by another user."""


@dataclass(frozen=True)
class Owner:
    """The credentials of an app's `user`: what the helper runs with."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


def app_owner(user: str | None, group: str | None) -> Owner | None:
    """The app user's credentials, when pmxd is root and they differ from its own; None
    otherwise (or when the user is unknown: spawning says so)."""
    if os.geteuid() != 0 or (user is None and group is None):
        return None
    try:
        account = pwd.getpwnam(user) if user else pwd.getpwuid(os.getuid())
        gid = grp.getgrnam(group).gr_gid if group else account.pw_gid
    except KeyError:
        return None
    if account.pw_uid == 0:
        return None
    return Owner(account.pw_name, account.pw_uid, gid,
                 tuple(os.getgrouplist(account.pw_name, gid)))


# ---------------------------------------------------------------- trust


def _is_ours(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _group_is_ours(gid: int) -> bool:
    if gid == 0:
        return True
    if gid != os.getegid():
        return False
    try:
        members = grp.getgrgid(gid).gr_mem
        me = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return False
    return all(member == me for member in members)


def _writers(info: os.stat_result) -> str | None:
    """Who else than root or pmxd's user can change this directory's entries, or None."""
    if not _is_ours(info.st_uid):
        return f"uid {info.st_uid}"
    if info.st_mode & stat.S_IWOTH:
        return "everyone"
    if info.st_mode & stat.S_IWGRP and not _group_is_ours(info.st_gid):
        return f"group {info.st_gid}"
    return None


def _is_sticky_ours(info: os.stat_result) -> bool:
    return bool(info.st_mode & stat.S_ISVTX) and _is_ours(info.st_uid)


def _split(path: str) -> tuple[str, str]:
    directory, name = os.path.split(os.path.abspath(path))
    if not name:
        raise IsADirectoryError(errno.EISDIR, "is a directory", path)
    return directory, name


def _walk(directory: str, *, create: bool) -> tuple[int, bool]:
    """An fd of `directory`, reached without following any symlink someone else could
    have planted: (fd, sticky). Raises UnsafePath when a directory on the way can be
    changed by another user; with `create`, makes missing directories 0700."""
    fd = os.open("/", DIR_FLAGS)
    pending = [part for part in reversed(directory.split("/")) if part not in ("", ".")]
    where, hops = "", 0
    try:
        while pending:
            part = pending.pop()
            info = os.fstat(fd)
            sticky = _is_sticky_ours(info)
            writers = _writers(info)
            if writers is not None and not sticky:
                raise UnsafeFolder(f"{where or '/'} is writable by {writers}")
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, DIR_MODE, dir_fd=fd)
                    child = os.open(part, DIR_FLAGS, dir_fd=fd)
                    os.fchmod(child, DIR_MODE)  # mkdir's mode went through the umask
                except FileExistsError:
                    child = os.open(part, DIR_FLAGS, dir_fd=fd)  # made meanwhile: judged next
            except OSError as exc:  # ELOOP or ENOTDIR: a symlink, judged by where it is
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                link = os.stat(part, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISLNK(link.st_mode):
                    raise
                if sticky and not _is_ours(link.st_uid):
                    raise UnsafeFolder(f"{where}/{part} is a symlink of uid {link.st_uid} in "
                                     f"{where or '/'}, which everyone can write") from None
                hops += 1
                if hops > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, "too many symlinks", directory) from None
                target = os.readlink(part, dir_fd=fd)
                pending.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
                if target.startswith("/"):
                    os.close(fd)
                    fd, where = os.open("/", DIR_FLAGS), ""
                continue
            os.close(fd)
            fd = child
            where = os.path.normpath(f"{where}/{part}")
        info = os.fstat(fd)
        sticky = _is_sticky_ours(info)
        writers = _writers(info)
        if writers is not None and not sticky:
            raise UnsafeFolder(f"{where or '/'} is writable by {writers}")
        return fd, sticky
    except BaseException:
        os.close(fd)
        raise


def _open_in(dir_fd: int, name: str, *, sticky: bool, create: bool) -> int:
    """Open `name` in a directory reached by `_walk`, for appending; None-free: raises."""
    for _ in range(8):  # a file removed or made between two opens: try again
        if create:
            try:
                fd = os.open(name, OPEN_FLAGS | os.O_CREAT | os.O_EXCL, FILE_MODE, dir_fd=dir_fd)
                os.fchmod(fd, FILE_MODE)
                os.set_blocking(fd, True)
                return fd
            except FileExistsError:
                pass
        try:
            fd = os.open(name, OPEN_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            if create:
                continue
            raise
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                stream = _own_stream(dir_fd, name, sticky=sticky)
                if stream is not None:
                    return stream
                raise UnsafePath("it is a symlink, and pmxd writes through none") from None
            if exc.errno == errno.ENXIO:  # a FIFO nobody reads
                raise UnsafePath("it is not a regular file (a FIFO)") from None
            raise
        try:
            _check_opened(os.fstat(fd), sticky=sticky)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise OSError(errno.EAGAIN, "the file keeps changing", name)


def _own_stream(dir_fd: int, name: str, *, sticky: bool) -> int | None:
    """/dev/stdout and /dev/stderr (links to /proc/self/fd/N in a folder only root can
    write): pmxd's own output, as PM2 configs for containers use it; None for any other
    symlink. The magic link goes straight to pmxd's own descriptor, through no folder."""
    if sticky:
        return None
    target = os.readlink(name, dir_fd=dir_fd)
    prefix = "/proc/self/fd/"
    if not (target.startswith(prefix) and target[len(prefix):].isdigit()):
        return None
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    os.set_blocking(fd, True)
    return fd


def _check_opened(info: os.stat_result, *, sticky: bool) -> None:
    if stat.S_ISCHR(info.st_mode) and not sticky:
        return  # /dev/null, /dev/full: only root makes devices
    if not stat.S_ISREG(info.st_mode):
        raise UnsafePath("it is not a regular file")
    if sticky and (info.st_uid != os.geteuid() or info.st_nlink != 1):
        raise UnsafePath("it is in a folder everyone can write, and is not pmxd's own "
                         "(or is hard-linked)")


# ---------------------------------------------------------------- the operations


def open_append(path: str, owner: Owner | None = None, *, create: bool = True) -> int:
    """An O_APPEND fd of the log file `path`, made 0600 (and its folders 0700) if missing.

    Raises UnsafePath (refused), FileNotFoundError (`create` false) or another OSError."""
    directory, name = _split(path)
    try:
        dir_fd, sticky = _walk(directory, create=create)
    except UnsafePath:
        if owner is None:
            raise
        return _as_user(owner, "open" if create else "existing", path, 0)
    try:
        return _open_in(dir_fd, name, sticky=sticky, create=create)
    finally:
        os.close(dir_fd)


def rotate(path: str, retain: int, owner: Owner | None = None) -> int:
    """path -> path.1 -> ... -> path.RETAIN (the oldest removed), then a new path: its fd.

    Renames happen inside the directory's fd (renameat never follows a symlink, and a
    planted link is only moved, never written through)."""
    directory, name = _split(path)
    try:
        dir_fd, sticky = _walk(directory, create=True)
    except UnsafePath:
        if owner is None:
            raise
        return _as_user(owner, "rotate", path, retain)
    try:
        _rename_chain(dir_fd, name, retain)
        return _open_in(dir_fd, name, sticky=sticky, create=True)
    finally:
        os.close(dir_fd)


def _rename_chain(dir_fd: int, name: str, retain: int) -> None:
    try:
        os.unlink(f"{name}.{retain}", dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    for number in range(retain - 1, 0, -1):
        try:
            os.rename(f"{name}.{number}", f"{name}.{number + 1}",
                      src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except FileNotFoundError:
            pass
    try:
        os.rename(name, f"{name}.1", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except FileNotFoundError:
        pass  # removed meanwhile: a new file starts all the same


def truncate(fd: int) -> None:
    """Empty an open log file; a device (/dev/null) has nothing to empty."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        os.ftruncate(fd, 0)


def truncate_path(path: str, owner: Owner | None = None) -> bool:
    """Empty the log file at `path` through a safely opened fd; False if there is none."""
    try:
        fd = open_append(path, owner, create=False)
    except FileNotFoundError:
        return False
    try:
        truncate(fd)
    finally:
        os.close(fd)
    return True


def create_new(path: str, mode: int = FILE_MODE) -> int:
    """A new, empty file at `path` for writing, exactly `mode`: a leftover file or
    symlink there (a crashed write, or planted) is removed, never written through. For
    the temporaries of PMX_HOME, whose folder home.py has checked."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        os.unlink(path)  # unlink removes a symlink itself
        fd = os.open(path, flags, mode)
    os.fchmod(fd, mode)
    return fd


# ---------------------------------------------------------------- as the app's user


def _user_operation(operation: str, path: str, retain: int) -> int:
    """What the forked child does once it has the app user's credentials: the kernel
    checks every step against that user, as if the app did it. Never follows the last
    component either, and accepts only a regular file."""
    flags = OPEN_FLAGS
    if operation != "existing":
        os.makedirs(os.path.dirname(path), DIR_MODE, exist_ok=True)
    if operation == "rotate":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{path}.{retain}")
        for number in range(retain - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{path}.{number}", f"{path}.{number + 1}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, f"{path}.1")
    try:
        create = os.O_CREAT | os.O_EXCL if operation != "existing" else 0
        fd = os.open(path, flags | create, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
    except FileExistsError:
        fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise OSError(errno.EINVAL, "it is not a regular file")
    os.set_blocking(fd, True)
    return fd


def _child(sock: socket.socket, owner: Owner, operation: str, path: str, retain: int) -> None:
    """The forked child: become the app's user, do the operation, send the fd; exit."""
    try:
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)  # a signal here must not wake pmxd's loop
        os.setgroups(list(owner.groups))
        os.setresgid(owner.gid, owner.gid, owner.gid)
        os.setresuid(owner.uid, owner.uid, owner.uid)
        os.umask(0o077)
        try:
            socket.send_fds(sock, [b"ok"], [_user_operation(operation, path, retain)])
        except OSError as exc:
            sock.send(f"{exc.errno} {exc.strerror}".encode())
    finally:
        os._exit(0)  # no cleanup of pmxd's objects, no stdio flush, whatever happened


def _as_user(owner: Owner, operation: str, path: str, retain: int) -> int:
    """Do `operation` in a forked child running as `owner`; the fd it opened, or its
    error as an OSError. A fork without exec: pmxd's interpreter may sit where the app
    user cannot read it (/root/.pyenv), and a fork costs about a millisecond. The child
    calls no lock another thread could hold (no logging, no imports) and exits at once."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        with theirs:
            pid = os.fork()
            if pid == 0:
                _child(theirs, owner, operation, os.path.abspath(path), retain)
        try:
            ours.settimeout(HELPER_TIMEOUT_S)
            message, fds, _, _ = socket.recv_fds(ours, 4096, 1)
            for fd in fds:  # received fds are inheritable: apps spawned later would get them
                os.set_inheritable(fd, False)
        except OSError:
            os.kill(pid, signal.SIGKILL)
            raise OSError(errno.ETIMEDOUT, f"no answer from the child running as "
                                           f"{owner.name}") from None
        finally:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    text = message.decode(errors="replace")
    if text == "ok" and fds:
        return fds[0]
    for fd in fds:
        os.close(fd)
    number, _, reason = text.partition(" ")
    if not number.isdigit():
        raise OSError(errno.EIO, f"the child running as {owner.name} failed")
    code = int(number)
    if code == errno.ENOENT:
        raise FileNotFoundError(code, f"{reason} (as {owner.name})")
    if code == errno.ELOOP:
        raise UnsafePath(f"it is a symlink (as {owner.name})")
    if code == errno.ENXIO:
        raise UnsafePath(f"it is not a regular file (a FIFO; as {owner.name})")
    raise OSError(code or errno.EINVAL, f"{reason} (as {owner.name})")
