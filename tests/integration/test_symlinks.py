"""pmxd never writes through a file planted in its way (issue 16 items 1 and 2).

An app's user (or anyone who can write in a log's directory) can plant a symlink, a
dangling symlink or a FIFO where pmxd will open, rotate or flush a log, or where it writes
its temporary files. pmxd as root must then neither append to, create, nor truncate the
file the link points to, must not hang on the FIFO, and must keep the app running with a
one-line warning that names the app, the key and the path.

The root-only cases run an app as `nobody` with its logs in a directory nobody owns; the
others use a directory of pmxd's own user, where pmxd refuses a symlink just the same.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CLI, Pmx, app_path, make_home, wait_until
from tests.integration.hostile_helpers import ecosystem, log_text, ping_ok

PRECIOUS = b"precious: must never change\n"
PAD = "x" * 90  # 100-byte stdout lines: a 1K log rotates every ten
TICKER = f"n=0; while :; do n=$((n+1)); echo tick $n {PAD}; echo tock $n >&2; sleep 0.05; done"


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: plants files as another user and runs an app as nobody")


@pytest.fixture
def place() -> Iterator[Path]:
    """A world-readable folder outside the home, with a root-owned file to protect."""
    base = Path(tempfile.mkdtemp(prefix="pmx-sl-", dir="/tmp"))
    base.chmod(0o755)
    (base / "precious").write_bytes(PRECIOUS)
    (base / "precious").chmod(0o644)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def nobody_dir(base: Path) -> Path:
    """A folder owned and writable by nobody: where nobody plants links."""
    folder = base / "nobody"
    folder.mkdir(mode=0o755)
    account = pwd.getpwnam("nobody")
    os.chown(folder, account.pw_uid, account.pw_gid)
    return folder


def ticker(name: str, folder: Path, *, user: str | None, **extra: Any) -> dict[str, Any]:
    """An app printing a line a tick on stdout (out.log in `folder`) and on stderr."""
    app: dict[str, Any] = {"name": name, "script": "/bin/sh", "args": ["-c", TICKER],
                           "interpreter": "none", "cwd": str(folder.parent),
                           "out_file": str(folder / "out.log"),
                           "error_file": str(folder / "err.log"), **extra}
    if user is not None:
        app["user"] = user
    return app


def plant_symlink(link: Path, target: Path) -> None:
    """Replace whatever is at `link` with a symlink, atomically (as an attacker would)."""
    temporary = link.with_name(link.name + ".planting")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    os.replace(temporary, link)


def tocks(path: Path) -> int:
    found = re.findall(r"tock (\d+)", log_text(path))
    return int(found[-1]) if found else 0


def wait_more_tocks(path: Path, count: int = 10) -> None:
    """Let the app print `count` more lines (its stderr log is the clock)."""
    start = tocks(path)
    wait_until(lambda: (tocks(path) >= start + count, tocks(path)), timeout=20,
               what=f"{count} more lines in {path}")


def warnings(pmx: Pmx) -> str:
    return "\n".join(line for line in log_text(pmx.home / "pmxd.log").splitlines()
                     if "WARNING" in line or "ERROR" in line)


def assert_warned(pmx: Pmx, *parts: str) -> None:
    wait_until(lambda: (all(part in line for line in [warnings(pmx)] for part in parts),
                        warnings(pmx)[-600:]),
               timeout=10, what=f"a warning naming {parts}")


def assert_precious(base: Path) -> None:
    target = base / "precious"
    assert target.read_bytes() == PRECIOUS
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


# ---------------------------------------------------------------- an app run as nobody


def test_symlink_planted_at_a_user_apps_log_is_not_followed(pmx: Pmx, place: Path) -> None:
    needs_root()
    folder = nobody_dir(place)
    plant_symlink(folder / "out.log", place / "precious")
    pmx.run("start", str(ecosystem(pmx, ticker("victim", folder, user="nobody"))))
    pmx.wait_status("victim", "online")
    wait_more_tocks(folder / "err.log")
    assert_precious(place)
    assert_warned(pmx, 'app "victim"', "out_file", str(folder / "out.log"))
    assert pmx.wait_status("victim", "online")
    # The stderr log, written with nobody's credentials in nobody's folder, is nobody's.
    info = (folder / "err.log").stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (pwd.getpwnam("nobody").pw_uid, 0o600)


def test_dangling_symlink_at_a_user_apps_log_creates_nothing(pmx: Pmx, place: Path) -> None:
    needs_root()
    folder = nobody_dir(place)
    plant_symlink(folder / "out.log", place / "created-by-root")
    pmx.run("start", str(ecosystem(pmx, ticker("victim", folder, user="nobody"))))
    wait_more_tocks(folder / "err.log")
    assert not (place / "created-by-root").exists()
    assert_warned(pmx, 'app "victim"', "out_file")
    assert pmx.wait_status("victim", "online")


def test_fifo_planted_at_a_user_apps_log_does_not_hang_pmxd(pmx: Pmx, place: Path) -> None:
    needs_root()
    folder = nobody_dir(place)
    os.mkfifo(folder / "out.log", 0o666)
    pmx.run("start", str(ecosystem(pmx, ticker("victim", folder, user="nobody"))))
    wait_more_tocks(folder / "err.log")
    assert ping_ok(pmx.home, timeout=5)
    assert_warned(pmx, 'app "victim"', "out_file")
    assert pmx.wait_status("victim", "online")


def test_rotation_with_retain_0_truncates_no_planted_target(pmx: Pmx, place: Path) -> None:
    needs_root()
    folder = nobody_dir(place)
    pmx.run("start", str(ecosystem(pmx, ticker("victim", folder, user="nobody",
                                                   max_log_size="1K", retain=0))))
    wait_more_tocks(folder / "err.log")
    plant_symlink(folder / "out.log", place / "precious")
    wait_more_tocks(folder / "err.log", 60)  # several rotations of the 1K stdout log
    assert_precious(place)
    assert pmx.wait_status("victim", "online")


def test_rotation_renames_nothing_through_planted_links(pmx: Pmx, place: Path) -> None:
    needs_root()
    folder = nobody_dir(place)
    pmx.run("start", str(ecosystem(pmx, ticker("victim", folder, user="nobody",
                                                   max_log_size="1K", retain=2))))
    wait_more_tocks(folder / "err.log")
    plant_symlink(folder / "out.log", place / "precious")
    plant_symlink(folder / "out.log.1", place / "precious")
    wait_more_tocks(folder / "err.log", 60)
    assert_precious(place)
    assert (folder / "out.log").is_file() and not (folder / "out.log").is_symlink()
    assert pmx.wait_status("victim", "online")


def test_flush_truncates_no_planted_target(pmx: Pmx, place: Path) -> None:
    needs_root()
    folder = nobody_dir(place)
    pmx.run("start", str(ecosystem(pmx, ticker("victim", folder, user="nobody"))))
    wait_more_tocks(folder / "err.log")
    pmx.run("stop", "victim")
    plant_symlink(folder / "out.log", place / "precious")
    result = pmx.run("flush", "victim", check=False)
    assert_precious(place)
    assert result.returncode == 1
    assert re.search(r'app "victim": cannot flush \S*out\.log: it is a symlink', result.stderr)
    # And while it runs (the open log is truncated through its own descriptor).
    (folder / "out.log").unlink()
    pmx.run("restart", "victim")
    wait_more_tocks(folder / "err.log")
    plant_symlink(folder / "out.log", place / "precious")
    pmx.run("flush", "victim", check=False)
    assert_precious(place)


def test_an_app_without_user_refuses_a_folder_another_user_can_write(
        pmx: Pmx, place: Path) -> None:
    needs_root()
    folder = nobody_dir(place)
    plant_symlink(folder / "out.log", place / "precious")
    pmx.run("start", str(ecosystem(pmx, ticker("victim", folder, user=None))))
    pmx.wait_status("victim", "online")
    assert_warned(pmx, 'app "victim"', "error_file", str(folder / "err.log"),
                  "writable by uid 65534")
    assert_precious(place)
    assert not (folder / "err.log").exists()  # pmxd created nothing there as root
    assert pmx.wait_status("victim", "online")


# ---------------------------------------------------------------- pmxd's own folders


def test_symlink_at_a_log_path_is_never_followed(pmx: Pmx, place: Path) -> None:
    folder = place / "own"
    folder.mkdir(mode=0o700)
    plant_symlink(folder / "out.log", place / "precious")
    pmx.run("start", str(ecosystem(pmx, ticker("victim", folder, user=None))))
    wait_more_tocks(folder / "err.log")
    assert_precious(place)
    assert_warned(pmx, 'app "victim"', "out_file", "symlink")
    assert pmx.wait_status("victim", "online")


def test_fifo_at_a_log_path_does_not_hang_pmxd(pmx: Pmx, place: Path) -> None:
    folder = place / "own"
    folder.mkdir(mode=0o700)
    os.mkfifo(folder / "out.log", 0o600)
    pmx.run("start", str(ecosystem(pmx, ticker("victim", folder, user=None))))
    wait_more_tocks(folder / "err.log")
    assert ping_ok(pmx.home, timeout=5)
    assert_warned(pmx, 'app "victim"', "out_file", "not a regular file")


def test_symlink_at_the_state_files_temp_is_not_followed(pmxd: Pmx, place: Path) -> None:
    plant_symlink(pmxd.home / ".state.json.tmp", place / "precious")
    pmxd.run("start", str(ecosystem(pmxd, ticker("victim", place, user=None))))
    pmxd.wait_status("victim", "online")
    wait_until(lambda: ("victim" in log_text(pmxd.home / "state.json"), None), timeout=10,
               what="state.json written")
    assert_precious(place)
    assert not (pmxd.home / "state.json").is_symlink()


def test_symlink_at_the_dumps_temp_is_not_followed(pmxd: Pmx, place: Path) -> None:
    pid = pmxd.daemon_pid()
    plant_symlink(pmxd.home / f".dump.toml.{pid}.tmp", place / "precious")
    pmxd.run("start", str(ecosystem(pmxd, ticker("victim", place, user=None))))
    pmxd.run("save")
    assert_precious(place)
    assert "victim" in (pmxd.home / "dump.toml").read_text()
    assert not (pmxd.home / "dump.toml").is_symlink()


# ---------------------------------------------------------------- item 2: modes


def test_every_file_pmxd_creates_has_its_mode_under_umask_000(place: Path) -> None:
    pmx = Pmx(make_home() / "h")
    outside = place / "made" / "by" / "pmxd"
    try:
        def hostile(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([*CLI, *args], env=pmx.env, capture_output=True, text=True,
                                  timeout=60, umask=0)

        eco = place / "eco.toml"
        eco.write_text(f'[[apps]]\nname = "t"\nscript = "/bin/sh"\ninterpreter = "none"\n'
                       f'args = ["-c", {TICKER!r}]\nout_file = "{outside}/out.log"\n'
                       f'max_log_size = "1K"\nretain = 2\n')
        assert hostile("start", str(eco)).returncode == 0
        wait_until(lambda: ((outside / "out.log.2").exists(), None), timeout=20,
                   what="two rotations")
        assert hostile("save").returncode == 0
        assert hostile("save").returncode == 0  # and the backup
        home = pmx.home
        wait_until(lambda: ((home / "state.json").exists(), None), timeout=10, what="state")
        expected = {home / name: 0o600 for name in (
            "state.json", "spawned.jsonl", "dump.toml", "dump.toml.bak", "pmxd.lock",
            "pmxd.pid", "pmxd.log", "rpc.sock", "pub.sock", "notify.sock")}
        expected.update({outside / name: 0o600 for name in ("out.log", "out.log.1",
                                                             "out.log.2")})
        expected.update({place / "made": 0o700, place / "made" / "by": 0o700, outside: 0o700})
        found = {str(p): oct(stat.S_IMODE(os.lstat(p).st_mode)) for p in expected}
        assert found == {str(p): oct(mode) for p, mode in expected.items()}
    finally:
        problems = pmx.cleanup()
        shutil.rmtree(pmx.home.parent, ignore_errors=True)
    assert not problems, problems


def test_dev_stdout_is_shared_by_every_instance_not_suffixed(pmx: Pmx) -> None:
    """out_file = "/dev/stdout" with several instances: each writes to pmxd's stdout, as
    with /dev/null; pmxd never creates /dev/stdout-0, /dev/stdout-1 (as root, in /dev)."""
    eco = pmx.write("dev.toml", f"""
[[apps]]
name = "devout"
script = "{app_path('idle.py')}"
instances = 2
out_file = "/dev/stdout"
""")
    pmx.run("start", str(eco))
    pmx.wait_status("devout", "online", count=2)
    assert not Path("/dev/stdout-0").exists() and not Path("/dev/stdout-1").exists()
