"""Whether execve would run a file as it is, for spawn.py's choice of the sh shim.

The shim ends in sh's `exec`, which differs from execve where execve fails: sh runs a file
the kernel refuses (ENOEXEC) as a shell script, and reports a missing interpreter or
loader as "not found" and exit 127 from the child, where subprocess raises at once and
the spawn fails with the reason. So the shim takes only what execve runs for certain: an
ELF of this machine whose loader is there, or a `#!` script whose interpreter (itself
such a file or script, up to the kernel's 4 levels) is there and executable. Anything
else goes through subprocess.

The paths are the app's: a file its user can replace. Only a regular file is opened
(stat first; a device node or FIFO is never opened), and with O_NONBLOCK in case it was
swapped for one since. Nothing read is executed or trusted beyond this yes or no.
"""

from __future__ import annotations

import os
import stat
import struct

MAX_NESTING = 4  # the kernel's limit of #! interpreters that are scripts themselves
PT_INTERP = 3
# os.uname().machine -> ELF e_machine; elsewhere any machine is taken on trust
_MACHINES = {"x86_64": 62, "aarch64": 183, "arm64": 183, "riscv64": 243, "ppc64le": 21,
             "s390x": 22, "i686": 3, "i386": 3}


def interpreter_of(path: str) -> str | None:
    """The interpreter a `#!` script names, for an error message; None for anything else."""
    head = _head(path)
    return _shebang(head) if head is not None else None


def _shebang(head: bytes) -> str | None:
    """The interpreter of a `#!` line that ends within `head`."""
    if not head.startswith(b"#!") or b"\n" not in head:
        return None  # no #!, or a #! line longer than this look
    words = head[2:].split(b"\n", 1)[0].split()
    return os.fsdecode(words[0]) if words else None


def _head(path: str) -> bytes | None:
    """The first 256 bytes of a regular file."""
    fd = _open_regular(path)
    if fd is None:
        return None
    try:
        return os.pread(fd, 256, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


def _open_regular(path: str) -> int | None:
    """An fd of `path` if it is a regular file (stat first: a device node or FIFO is never
    opened; O_NONBLOCK in case it was swapped for one since, and checked again)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def execve_runs_it(path: str, cwd: str, _depth: int = 0) -> bool:
    """True when execve(path) would run it in an app whose directory is `cwd` (where a
    relative #! interpreter is found)."""
    if _depth > MAX_NESTING:
        return False
    fd = _open_regular(path)
    if fd is None:
        return False
    try:
        head = os.pread(fd, 256, 0)
        if head.startswith(b"\x7fELF"):
            return _elf_runs_here(fd, head)
    except (OSError, struct.error):
        return False
    finally:
        os.close(fd)
    named = _shebang(head)
    if named is None:
        return False  # let execve judge
    interpreter = os.path.join(cwd, named)  # an absolute one stays as it is
    return os.access(interpreter, os.X_OK) and execve_runs_it(interpreter, cwd, _depth + 1)


def _elf_runs_here(fd: int, head: bytes) -> bool:
    """An ELF for this machine whose program interpreter (the dynamic loader) exists."""
    if len(head) < 64 or head[4] not in (1, 2) or head[5] not in (1, 2):
        return False
    wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
    machine = struct.unpack_from(order + "H", head, 18)[0]
    expected = _MACHINES.get(os.uname().machine)
    if expected is not None and machine != expected:
        return False  # another architecture: execve says ENOEXEC
    if wide:
        phoff, = struct.unpack_from(order + "Q", head, 32)
        entry_size, count = struct.unpack_from(order + "HH", head, 54)
    else:
        phoff, = struct.unpack_from(order + "I", head, 28)
        entry_size, count = struct.unpack_from(order + "HH", head, 42)
    if count > 256 or entry_size < (56 if wide else 32):
        return False
    table = os.pread(fd, entry_size * count, phoff)
    for index in range(count):
        base = index * entry_size
        if struct.unpack_from(order + "I", table, base)[0] != PT_INTERP:
            continue
        if wide:
            offset, = struct.unpack_from(order + "Q", table, base + 8)
            size, = struct.unpack_from(order + "Q", table, base + 32)
        else:
            offset, = struct.unpack_from(order + "I", table, base + 4)
            size, = struct.unpack_from(order + "I", table, base + 16)
        if size > 4096:
            return False
        loader = os.pread(fd, size, offset).split(b"\0", 1)[0]
        return os.path.isfile(os.fsdecode(loader))
    return True  # static: no loader needed
