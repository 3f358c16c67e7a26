"""pmx web's access token: one random secret in a 0600 file, created on first use.

The default file is PMX_HOME/web.token (the home is 0700 already); `--token-file` names
another one for services. A token file that group or others can read is refused rather
than used, since anyone who can read it can drive every app. Standard library only.
"""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from pmx.supervisor.errors import HomeError
from pmx.supervisor.home import prepare_home

TOKEN_FILE = "web.token"
TOKEN_BYTES = 32  # 43 characters of urlsafe base64


def default_token_path(home: Path) -> Path:
    return home / TOKEN_FILE


def load_or_create_token(path: Path, *, home: Path | None = None) -> str:
    """The token in `path`, creating the file (0600, and the home when it is the
    default one) with a new random token if it does not exist. Raises HomeError when
    the file is unsafe or unreadable."""
    if home is not None and path.parent == home:
        prepare_home(home)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return _read_token(path)
    except OSError as exc:
        raise HomeError(f"cannot create the token file {path}: {exc.strerror}") from None
    token = secrets.token_urlsafe(TOKEN_BYTES)
    with os.fdopen(fd, "w") as file:
        file.write(token + "\n")
    return token


def _read_token(path: Path) -> str:
    try:
        info = os.stat(path)
        text = path.read_text()
    except OSError as exc:
        raise HomeError(f"cannot read the token file {path}: {exc.strerror}") from None
    if info.st_uid != os.getuid():
        raise HomeError(f"refusing the token file {path}: it belongs to uid {info.st_uid}")
    if info.st_mode & 0o077:
        raise HomeError(f"refusing the token file {path}: group or others can read it "
                        f"(mode {stat.S_IMODE(info.st_mode):o}); chmod 600 it")
    token = text.strip()
    if len(token) < 16 or any(ch.isspace() for ch in token):
        raise HomeError(f"the token file {path} holds no usable token (at least 16 "
                        "characters, no spaces); delete it to get a new one")
    return token


def token_matches(expected: str, given: str) -> bool:
    """Constant-time comparison, so the token cannot be guessed byte by byte."""
    return hmac.compare_digest(expected.encode(), given.encode())
