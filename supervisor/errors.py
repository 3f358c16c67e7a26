"""The exception tree of pmx, and the exit codes the CLI uses.

    PmxError                      anything a user can be told in one line
    ├── ConfigError               a bad ecosystem file or app spec (exit 2)
    ├── ProtocolError             a malformed control message (carries an ErrorCode)
    ├── CommandError              a command the daemon refused or that failed (carries a code)
    ├── SpawnError                the OS would not start an app's process
    ├── HomeError                 PMX_HOME is unsafe or unusable
    └── DaemonUnreachable         no daemon answered (exit 3)
    IllegalTransition             a bug: a state move the table forbids (not a PmxError)
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2  # bad usage or a bad config file
    UNREACHABLE = 3  # no daemon answered


class PmxError(Exception):
    """An error a user is shown as one line, without a traceback."""

    exit_code: ExitCode = ExitCode.FAILED


class ConfigError(PmxError):
    exit_code = ExitCode.USAGE


class ProtocolError(PmxError):
    """A control message that cannot be processed. `code` is a protocol ErrorCode value."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


class CommandError(PmxError):
    """The daemon refused or failed a command. `code` is a protocol ErrorCode value."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        if code in ("bad_args", "not_found"):
            self.exit_code = ExitCode.USAGE


class SpawnError(PmxError):
    pass


class HomeError(PmxError):
    pass


class DaemonUnreachable(PmxError):
    exit_code = ExitCode.UNREACHABLE


class IllegalTransition(Exception):
    """A state move that the transition table forbids: always a bug in pmx."""

    def __init__(self, who: str, old: str, new: str) -> None:
        super().__init__(f"{who}: illegal state move {old} -> {new}")
