"""Is a process tree accepting connections on a socket? Read from /proc, for readiness.

A cluster instance that pmx gave a listening socket is ready when it waits for
connections on it. Without asking the app anything, the kernel shows that: a process of
the instance's tree (the main process or a worker) has the socket (same inode) and
- registered it in an epoll set (the `tfd:` lines of the epoll fd's /proc fdinfo:
  Node, Go, Rust, asyncio, uvicorn), or
- has a thread blocked in accept() on it, or in poll()/select() on a set that holds it
  (the syscall and its arguments are in /proc/PID/task/TID/syscall; the poll or select
  set is read from /proc/PID/mem: http.server, gunicorn's sync workers).
Reading another process's memory needs ptrace rights, which pmxd has over its own
children (as their ancestor, or as root); without them that one check is skipped.

Everything here is a cheap read of /proc, called a few times a second for an instance
that is starting; nothing is kept between calls.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

# Syscall numbers: (accept, accept4), (poll, ppoll), (select, pselect6).
_SYSCALLS = {
    "x86_64": ({43, 288}, {7, 271}, {23, 270}),
    "aarch64": ({202, 242}, {73}, {72}),
}
ACCEPT, POLL, SELECT = _SYSCALLS.get(os.uname().machine, (set(), set(), set()))
MAX_POLL_FDS = 4096
MAX_TREE = 256


def socket_inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def is_accepting(root: int, inodes: Iterable[int]) -> bool:
    """True when a process of `root`'s tree waits for connections on one of `inodes`."""
    wanted = set(inodes)
    if not wanted:
        return False
    for pid in _tree(root):
        try:
            if _process_accepts(pid, wanted):
                return True
        except OSError:
            continue  # gone, or not ours to read
    return False


def _tree(root: int) -> list[int]:
    pids: list[int] = []
    stack = [root]
    while stack and len(pids) < MAX_TREE:
        pid = stack.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as file:
                    stack.extend(int(child) for child in file.read().split())
        except OSError:
            continue
    return pids


def _process_accepts(pid: int, wanted: set[int]) -> bool:
    ours: set[int] = set()  # the process's fds that are one of the sockets
    epolls: list[str] = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in wanted:
            ours.add(int(name))
        elif target == "anon_inode:[eventpoll]":
            epolls.append(name)
    if not ours:
        return False
    for epoll in epolls:
        with open(f"/proc/{pid}/fdinfo/{epoll}") as file:
            for line in file:
                if line.startswith("tfd:") and int(line.split()[1]) in ours:
                    return True
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/syscall") as file:
                fields = file.read().split()
        except OSError:
            continue
        if len(fields) < 3 or not fields[0].isdigit():
            continue  # "running", or no syscall
        number, args = int(fields[0]), [int(a, 16) for a in fields[1:7]]
        if number in ACCEPT and args[0] in ours:
            return True
        if number in POLL and _poll_set_holds(pid, args[0], args[1], ours):
            return True
        if number in SELECT and _select_set_holds(pid, args[1], args[0], ours):
            return True
    return False


def _read_memory(pid: int, address: int, size: int) -> bytes:
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        memory.seek(address)
        return memory.read(size)


def _poll_set_holds(pid: int, address: int, count: int, ours: set[int]) -> bool:
    """struct pollfd {int fd; short events; short revents;}[count] at `address`."""
    if not 0 < count <= MAX_POLL_FDS or not address:
        return False
    data = _read_memory(pid, address, 8 * count)
    return any(fd in ours for (fd, _, _) in struct.iter_unpack("ihh", data[: len(data) // 8 * 8]))


def _select_set_holds(pid: int, address: int, nfds: int, ours: set[int]) -> bool:
    """The read set of select(): a bitmap of `nfds` bits at `address`."""
    if not 0 < nfds <= MAX_POLL_FDS or not address:
        return False
    data = _read_memory(pid, address, (nfds + 63) // 64 * 8)
    return any(fd < nfds and data[fd // 8] >> (fd % 8) & 1 for fd in ours if fd // 8 < len(data))
