"""safe_files and LogFile: nothing planted in the way is written through (issue 16 items 1
and 2). Real files in a temporary folder; the cases that need another user skip when not
root."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pmx.supervisor import safe_files
from pmx.supervisor.errors import CommandError
from pmx.supervisor.logs import LogFile, LogFiles
from pmx.supervisor.safe_files import UnsafeFolder, UnsafePath

PRECIOUS = b"precious\n"


@pytest.fixture
def folder() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="pmx-sf-", dir="/tmp"))
    base.chmod(0o755)
    (base / "precious").write_bytes(PRECIOUS)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def umask_777() -> Iterator[None]:
    old = os.umask(0o777)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def nobody_folder(base: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("needs root: a folder of another user, an operation as nobody")
    folder = base / "nobody"
    folder.mkdir(mode=0o755)
    account = pwd.getpwnam("nobody")
    os.chown(folder, account.pw_uid, account.pw_gid)
    return folder


def nobody() -> safe_files.Owner:
    owner = safe_files.app_owner("nobody", None)
    assert owner is not None
    return owner


# ---------------------------------------------------------------- modes (item 2)


def test_new_log_and_its_folders_get_0600_and_0700_whatever_the_umask(
        folder: Path, umask_777: None) -> None:
    fd = safe_files.open_append(str(folder / "a" / "b" / "out.log"))
    os.close(fd)
    assert (mode(folder / "a"), mode(folder / "a" / "b")) == (0o700, 0o700)
    assert mode(folder / "a" / "b" / "out.log") == 0o600


def test_log_file_is_made_0600_under_any_umask(folder: Path, umask_777: None) -> None:
    file = LogFile(folder / "logs" / "app.log", max_size=None, retain=0)
    file.write(b"line\n")
    file.close()
    assert (folder / "logs" / "app.log").read_bytes() == b"line\n"
    assert (mode(folder / "logs"), mode(folder / "logs" / "app.log")) == (0o700, 0o600)


def test_create_new_replaces_a_planted_symlink_and_sets_the_mode(
        folder: Path, umask_777: None) -> None:
    (folder / ".tmp").symlink_to(folder / "precious")
    fd = safe_files.create_new(str(folder / ".tmp"))
    os.write(fd, b"new")
    os.close(fd)
    assert (folder / "precious").read_bytes() == PRECIOUS
    assert not (folder / ".tmp").is_symlink() and (folder / ".tmp").read_bytes() == b"new"
    assert mode(folder / ".tmp") == 0o600


# ---------------------------------------------------------------- what is refused


def test_a_symlink_at_the_log_path_is_refused(folder: Path) -> None:
    (folder / "out.log").symlink_to(folder / "precious")
    with pytest.raises(UnsafePath, match="symlink"):
        safe_files.open_append(str(folder / "out.log"))
    assert (folder / "precious").read_bytes() == PRECIOUS


def test_a_dangling_symlink_creates_nothing(folder: Path) -> None:
    (folder / "out.log").symlink_to(folder / "made")
    with pytest.raises(UnsafePath, match="symlink"):
        safe_files.open_append(str(folder / "out.log"))
    assert not (folder / "made").exists()


@pytest.mark.timeout(10)
def test_a_fifo_is_refused_without_hanging(folder: Path) -> None:
    os.mkfifo(folder / "out.log")
    with pytest.raises(UnsafePath, match="not a regular file"):
        safe_files.open_append(str(folder / "out.log"))


@pytest.mark.timeout(10)
def test_a_fifo_someone_reads_is_refused_too(folder: Path) -> None:
    os.mkfifo(folder / "out.log")
    reader = os.open(folder / "out.log", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(UnsafePath, match="not a regular file"):
            safe_files.open_append(str(folder / "out.log"))
    finally:
        os.close(reader)


def test_dev_null_is_a_log_path_as_before() -> None:
    fd = safe_files.open_append("/dev/null")
    try:
        assert os.write(fd, b"x") == 1
        safe_files.truncate(fd)  # nothing to empty, no error
    finally:
        os.close(fd)


def test_dev_stdout_is_pmxds_own_output_as_in_pm2_container_configs() -> None:
    fd = safe_files.open_append("/dev/stdout")
    try:
        assert os.path.samestat(os.fstat(fd), os.fstat(1))
    finally:
        os.close(fd)


def test_a_folder_everyone_can_write_is_refused(folder: Path) -> None:
    shared = folder / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeFolder, match=f"{shared} is writable by everyone"):
        safe_files.open_append(str(shared / "out.log"))
    assert list(shared.iterdir()) == []


def test_a_symlinked_folder_is_followed_only_where_no_one_else_could_plant_it(
        folder: Path) -> None:
    (folder / "real").mkdir()
    (folder / "link").symlink_to(folder / "real")
    os.close(safe_files.open_append(str(folder / "link" / "out.log")))
    assert (folder / "real" / "out.log").is_file()
    shared = folder / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "logs").symlink_to(folder / "real")
    with pytest.raises(UnsafeFolder):
        safe_files.open_append(str(shared / "logs" / "other.log"))
    assert not (folder / "real" / "other.log").exists()


def test_in_a_sticky_folder_only_our_own_unlinked_file_is_used(folder: Path) -> None:
    sticky = folder / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    os.close(safe_files.open_append(str(sticky / "out.log")))
    os.link(folder / "precious", sticky / "linked.log")
    with pytest.raises(UnsafePath, match="hard-linked"):
        safe_files.open_append(str(sticky / "linked.log"))
    assert (folder / "precious").read_bytes() == PRECIOUS


# ---------------------------------------------------------------- rotation and flush


def test_rotation_renames_inside_the_folder_and_moves_planted_links(folder: Path) -> None:
    path = folder / "out.log"
    path.write_bytes(b"current\n")
    (folder / "out.log.1").symlink_to(folder / "precious")
    fd = safe_files.rotate(str(path), 2)
    os.write(fd, b"new\n")
    os.close(fd)
    assert path.read_bytes() == b"new\n" and (folder / "out.log.1").read_bytes() == b"current\n"
    assert (folder / "out.log.2").is_symlink()  # moved, never written through
    assert (folder / "precious").read_bytes() == PRECIOUS


def test_rotation_with_retain_0_empties_its_own_file_not_a_planted_link(folder: Path) -> None:
    path = folder / "out.log"
    file = LogFile(path, max_size=10, retain=0)
    file.write(b"0123456789\n")
    path.unlink()
    path.symlink_to(folder / "precious")
    file.write(b"more\n")  # over 10 bytes: rotates
    file.close()
    assert (folder / "precious").read_bytes() == PRECIOUS


def test_flush_of_a_closed_log_refuses_a_planted_symlink(folder: Path) -> None:
    (folder / "out.log").symlink_to(folder / "precious")
    with pytest.raises(CommandError, match=r"cannot flush .*out\.log: it is a symlink"):
        LogFiles().flush({folder / "out.log"})
    assert (folder / "precious").read_bytes() == PRECIOUS


def test_flush_of_an_open_log_truncates_its_own_descriptor(folder: Path) -> None:
    files = LogFiles()
    file = files.acquire(folder / "out.log", max_size=None, retain=0)
    file.write(b"line\n")
    (folder / "out.log").unlink()
    (folder / "out.log").symlink_to(folder / "precious")
    files.flush({folder / "out.log"})
    files.close_all()
    assert (folder / "precious").read_bytes() == PRECIOUS


def test_a_refused_log_warns_once_naming_it_and_is_not_retried_per_line(
        folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    (folder / "out.log").symlink_to(folder / "precious")
    file = LogFile(folder / "out.log", max_size=None, retain=0, label='app "api" out_file')
    with caplog.at_level(logging.WARNING):
        for _ in range(100):
            file.write(b"line\n")
    assert file.dropped_lines == 100
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert warnings[0].startswith(f'app "api" out_file: cannot write log {folder}/out.log: '
                                  "it is a symlink")


# ---------------------------------------------------------------- as the app's user


def test_in_a_users_folder_the_log_is_opened_as_that_user(folder: Path) -> None:
    theirs = nobody_folder(folder)
    fd = safe_files.open_append(str(theirs / "logs" / "out.log"), nobody())
    os.close(fd)
    info = (theirs / "logs" / "out.log").stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (pwd.getpwnam("nobody").pw_uid, 0o600)
    with pytest.raises(UnsafeFolder, match="writable by uid 65534"):
        safe_files.open_append(str(theirs / "out.log"))  # and never as root


def test_as_the_user_a_symlink_or_fifo_is_refused_too(folder: Path) -> None:
    theirs = nobody_folder(folder)
    (theirs / "out.log").symlink_to(folder / "precious")
    with pytest.raises(UnsafePath, match="symlink"):
        safe_files.open_append(str(theirs / "out.log"), nobody())
    os.mkfifo(theirs / "fifo.log")
    os.chown(theirs / "fifo.log", pwd.getpwnam("nobody").pw_uid, -1)
    with pytest.raises(UnsafePath, match="FIFO"):
        safe_files.open_append(str(theirs / "fifo.log"), nobody())
    assert (folder / "precious").read_bytes() == PRECIOUS


def test_rotation_and_flush_in_a_users_folder_run_as_that_user(folder: Path) -> None:
    theirs = nobody_folder(folder)
    path = theirs / "out.log"
    fd = safe_files.open_append(str(path), nobody())
    os.write(fd, b"first\n")
    os.close(fd)
    fd = safe_files.rotate(str(path), 1, nobody())
    os.write(fd, b"second\n")
    os.close(fd)
    assert (theirs / "out.log.1").read_bytes() == b"first\n"
    assert safe_files.truncate_path(str(path), nobody()) is True
    assert path.read_bytes() == b""
    path.unlink()
    path.symlink_to(folder / "precious")
    with pytest.raises(UnsafePath):
        safe_files.truncate_path(str(path), nobody())
    assert (folder / "precious").read_bytes() == PRECIOUS
