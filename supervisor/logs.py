"""Children's output: non-blocking pipe readers, log files with rotation, the live stream.

Each instance's stdout and stderr are pipes whose read ends sit on the event loop. A
reader takes whatever is there (up to 256 KiB per wake-up), cuts it into lines, writes
them to the log file in one write and publishes them as one message, so a child that
prints fast pays one syscall per chunk, never one per line. The pipe is enlarged to
1 MiB so that a burst does not block the child while the daemon is busy elsewhere.

Lines longer than MAX_LINE_BYTES are split there, and a line without a newline is held
back only until that size: a 10 MB line costs bounded memory.

A log file that cannot be written (disk full) does not stop the app or the daemon: the
lines are dropped, a warning is logged at most once a minute, and writing resumes when
the disk has room again (tried again after 0.25 s, doubling to 8 s, never per line).

Log files are opened, rotated and flushed only through safe_files (issue 16): never
through a symlink or into a FIFO, and in a folder another user can write only with the
app's `user` credentials; any other log there is refused with a warning that names the
app, the key (out_file, error_file) and the folder. Flush and `retain = 0` rotation empty
the open file through its descriptor; rotation renames inside the folder's descriptor.

`OutputRouter` wires an instance's two pipes: each chunk of lines goes to the app's log
file, to the live stream (topic log.APP:), to the instance's stderr tail (shown when a
start fails) and, in container mode, to pmxd's own stdout prefixed with "app:N | ". With
`log_date_format`, every one of them gets the lines stamped as the file has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from . import safe_files
from .date_format import compile_date_format
from .errors import CommandError
from .protocol import log_topic
from .safe_files import Owner

if TYPE_CHECKING:
    from .app import AppGroup
    from .config import AppSpec
    from .process import Instance

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 64 * 1024
READ_CHUNK = 256 * 1024
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = 1031
WARN_EVERY_S = 60.0
RETRY_FIRST_S = 0.25  # after a failed open or write, the next try; doubled each failure
RETRY_MAX_S = 8.0
UNSAFE_HINT = ("; pmxd writes a log only where no other user can plant a link: choose a "
               "folder only pmxd's user can write, or run the app as that folder's user")

LineSink = Callable[[str, list[bytes], bytes], None]  # (stream, lines, as in the file)


class LogFile:
    """An append-only log file, shared by the instances that write to it.

    Opened, rotated and emptied only through safe_files: never through a symlink, never
    in a folder another user can write unless as the app's `user` (`owner`). Opening
    happens once per file and per rotation, never per line. After a failure the file is
    not opened again for a while (RETRY_FIRST_S, doubling to RETRY_MAX_S), so a refused
    path or a full disk costs no syscall per line."""

    def __init__(self, path: Path, *, max_size: int | None, retain: int,
                 owner: Owner | None = None, label: str = "") -> None:
        self.path = path
        self.max_size = max_size
        self.retain = retain
        self.owner = owner
        self.label = label  # 'app "api" out_file', for warnings
        self.users = 0
        self._fd: int | None = None
        self._size = 0
        self._last_warning = 0.0
        self._retry_at = 0.0
        self._retry_s = RETRY_FIRST_S
        self.dropped_lines = 0

    def _open(self) -> int:
        if self._fd is None:
            self._fd = safe_files.open_append(str(self.path), self.owner)
            self._size = os.fstat(self._fd).st_size
        return self._fd

    def write(self, data: bytes) -> None:
        if self._fd is None and time.monotonic() < self._retry_at:
            self.dropped_lines += data.count(b"\n")
            return
        try:
            fd = self._open()
            if self.max_size is not None and self._size + len(data) > self.max_size and self._size:
                fd = self._rotate()
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
                self._size += written
            self._retry_s = RETRY_FIRST_S
        except OSError as exc:
            self._failed(data, exc)

    def _failed(self, data: bytes, exc: OSError) -> None:
        self.dropped_lines += data.count(b"\n")
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            hint = UNSAFE_HINT if isinstance(exc, safe_files.UnsafeFolder) else ""
            log.warning("%scannot write log %s: %s%s; dropping lines until it can "
                        "(%d dropped so far)", f"{self.label}: " if self.label else "",
                        self.path, exc.strerror or exc, hint, self.dropped_lines)
        self.close()  # reopen later: the file may have been replaced or freed
        self._retry_at = now + self._retry_s
        self._retry_s = min(self._retry_s * 2, RETRY_MAX_S)

    def _rotate(self) -> int:
        """file -> file.1 -> file.2 ... keeping `retain` rotated files; with retain 0 the
        open file is emptied through its own descriptor."""
        if self.retain <= 0:
            fd = self._open()
            safe_files.truncate(fd)
            self._size = 0
            return fd
        self.close()
        self._fd = safe_files.rotate(str(self.path), self.retain, self.owner)
        self._size = 0
        return self._fd

    def truncate(self) -> None:
        """Empty the file: the open one through its descriptor, else a safely opened one."""
        if self._fd is not None:
            safe_files.truncate(self._fd)
            self._size = 0
        else:
            safe_files.truncate_path(str(self.path), self.owner)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class LogFiles:
    """The open log files by path, so that merged logs share one file."""

    def __init__(self) -> None:
        self._files: dict[Path, LogFile] = {}

    def acquire(self, path: Path, *, max_size: int | None, retain: int,
                spec: AppSpec | None = None, stream: str = "out") -> LogFile:
        """The file at `path`; `spec` gives the app's user (who writes in a folder pmxd
        does not trust) and the names its warnings use."""
        file = self._files.get(path)
        if file is None:
            owner, label = _owner_and_label(spec, stream)
            file = self._files[path] = LogFile(path, max_size=max_size, retain=retain,
                                               owner=owner, label=label)
        file.users += 1
        return file

    def release(self, file: LogFile) -> None:
        file.users -= 1
        if file.users <= 0:
            file.close()
            self._files.pop(file.path, None)

    def flush(self, paths: set[Path], spec: AppSpec | None = None) -> None:
        """Empty these files; raises CommandError naming those that were refused or
        failed, once every other one is done."""
        problems: list[str] = []
        owner, _ = _owner_and_label(spec, "out")
        for path in sorted(paths):
            file = self._files.get(path)
            try:
                if file is not None:
                    file.truncate()
                else:
                    safe_files.truncate_path(str(path), owner)
            except OSError as exc:
                problems.append(f"{path}: {exc.strerror or exc}")
        if problems:
            who = f'app "{spec.name}": ' if spec is not None else ""
            raise CommandError("failed", f"{who}cannot flush " + "; ".join(problems))

    def close_all(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()


def _owner_and_label(spec: AppSpec | None, stream: str) -> tuple[Owner | None, str]:
    if spec is None:
        return None, ""
    key = spec.out_file if stream == "out" else spec.error_file
    label = f'app "{spec.name}"' + ("" if key is None else
                                    " out_file" if stream == "out" else " error_file")
    return safe_files.app_owner(spec.user, spec.group), label


class PipeReader:
    """Reads one child's stdout or stderr until EOF; never blocks the loop or the child."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        fd: int,
        *,
        stream: str,
        file: LogFile,
        date_format: str | None,
        sink: LineSink,
        on_close: Callable[[PipeReader], None],
    ) -> None:
        self._loop = loop
        self.fd = fd
        self.stream = stream
        self.file = file
        # Compiled once: PM2's day.js tokens or strftime, the stamp cached per second.
        self._stamp = compile_date_format(date_format) if date_format else None
        self._sink = sink
        self._on_close = on_close
        self.partial = b""  # a line begun: held until its newline
        os.set_blocking(fd, False)
        try:
            fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size for an unprivileged user: keep 64 KiB
        loop.add_reader(fd, self._on_readable)

    def _on_readable(self) -> None:
        chunk = read_available(lambda: os.read(self.fd, READ_CHUNK))
        if chunk is None:
            return
        if not chunk:
            self.close()
            return
        data = self.partial + chunk
        lines = data.split(b"\n")
        self.partial = lines.pop()
        as_read = len(self.partial) < MAX_LINE_BYTES
        while len(self.partial) >= MAX_LINE_BYTES:
            lines.append(self.partial[:MAX_LINE_BYTES])
            self.partial = self.partial[MAX_LINE_BYTES:]
        if lines:
            # Per chunk, not per line: a line-by-line loop in Python would cost more than
            # the app's own writing (200,000 lines a second are an ordinary burst).
            if max(map(len, lines)) > MAX_LINE_BYTES:
                self._emit([piece for line in lines for piece in _split_long(line)])
            elif as_read:  # the file gets the bytes as read, without joining the lines again
                self._emit(lines, data[:len(data) - len(self.partial)])
            else:
                self._emit(lines)

    def _emit(self, lines: list[bytes], text: bytes | None = None) -> None:
        """`text`: the lines as they are in the file, when the caller has them."""
        if self._stamp is not None:
            # Stamped once per chunk, here: the file and the live stream get the same text.
            prefix = self._stamp() + b": "
            lines, text = [prefix + line for line in lines], None
        block = text if text is not None else b"\n".join(lines) + b"\n"
        self.file.write(block)
        self._sink(self.stream, lines, block)

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.partial:
            self._emit([self.partial])
            self.partial = b""
        self._loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1
        self._on_close(self)


def read_available(read: Callable[[], bytes]) -> bytes | None:
    """One non-blocking read: the bytes, b"" at end of file (or on an error, which ends
    the stream the same way), None when nothing is there yet."""
    try:
        return read()
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def _split_long(line: bytes) -> list[bytes]:
    if len(line) <= MAX_LINE_BYTES:
        return [line]
    return [line[i:i + MAX_LINE_BYTES] for i in range(0, len(line), MAX_LINE_BYTES)]


def default_log_path(logs_dir: Path, app: str, stream: str, index: int | None) -> Path:
    """PM2's naming: NAME-out-N.log, or NAME-out.log for merged logs."""
    suffix = f"-{index}" if index is not None else ""
    return logs_dir / f"{app}-{stream}{suffix}.log"


def instance_log_path(configured: str | None, logs_dir: Path, app: str, stream: str,
                      index: int, merged: bool) -> Path:
    if configured is None:
        return default_log_path(logs_dir, app, stream, None if merged else index)
    path = Path(configured)
    if merged or configured.startswith(("/dev/", "/proc/self/fd/")):
        return path  # a device (/dev/null, /dev/stdout): every instance writes to it
    # Several instances, one configured name: PM2 suffixes the instance number.
    return path.with_name(f"{path.stem}-{index}{path.suffix}")


class OutputRouter:
    """Reads every instance's stdout and stderr into files, the live stream and the tail."""

    def __init__(self, loop: asyncio.AbstractEventLoop, log_files: LogFiles, *,
                 publish_lines: Callable[[str, Mapping[str, object], bytes], None],
                 echo: bool) -> None:
        self._loop = loop
        self._log_files = log_files
        self._publish_lines = publish_lines  # ControlServer.publish_lines: the live stream
        self._echo = echo  # container mode: also to our stdout
        self._readers: dict[str, list[PipeReader]] = {}  # by the spawn's run_id

    def attach(self, app: AppGroup, instance: Instance, stdout_fd: int | None,
               stderr_fd: int | None, partial: Mapping[str, bytes] | None = None) -> None:
        """Read the instance's pipes. A pipe may be missing, and a line begun (`partial`,
        by stream) when the previous pmxd image handed the pipes over (`pmx update`)."""
        topic = log_topic(instance.app)
        echo_prefix = f"{instance.app}:{instance.index} | ".encode()

        def sink(stream: str, lines: list[bytes], block: bytes) -> None:
            if self._echo:
                _echo(echo_prefix, lines)
            if stream == "error":
                instance.stderr_tail.extend(line.decode("utf-8", "replace") for line in lines[-20:])
            # As read: pmxd neither decodes nor escapes a line for the stream (subscribers do).
            self._publish_lines(topic, {"app": instance.app, "id": instance.id,
                                        "instance": instance.index, "stream": stream}, block)

        run_id = instance.run_id
        readers = self._readers.setdefault(run_id, [])

        def closed(reader: PipeReader) -> None:
            self._log_files.release(reader.file)
            readers.remove(reader)
            if not readers:
                self._readers.pop(run_id, None)

        for fd, stream in ((stdout_fd, "out"), (stderr_fd, "error")):
            if fd is None:
                continue
            reader = PipeReader(self._loop, fd, stream=stream,
                                file=app.acquire_log(instance.index, stream),
                                date_format=app.spec.log_date_format, sink=sink, on_close=closed)
            reader.partial = (partial or {}).get(stream, b"")
            readers.append(reader)

    def hand_over(self, instance: Instance) -> dict[str, tuple[int, bytes]]:
        """`pmx update`: stop reading the instance's pipes and keep them open across exec:
        stream -> (fd, the line begun). Its log files stay for this image to close."""
        handed: dict[str, tuple[int, bytes]] = {}
        for reader in self._readers.pop(instance.run_id, []):
            self._loop.remove_reader(reader.fd)
            os.set_inheritable(reader.fd, True)
            handed[reader.stream] = (reader.fd, reader.partial)
        return handed


def _echo(prefix: bytes, lines: list[bytes]) -> None:
    try:
        sys.stdout.buffer.write(b"".join(prefix + line + b"\n" for line in lines))
        sys.stdout.buffer.flush()
    except (OSError, ValueError):
        pass  # a closed stdout must not stop the apps
