"""`pmx save` and `pmx resurrect`: the dump is an ecosystem file, written atomically.

A save keeps the previous dump as dump.toml.bak, refuses to overwrite a non-empty dump
with nothing unless forced, and when the write fails (read-only or full file system)
says which file it could not write and leaves the previous dump byte-identical.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pmx.supervisor.config import parse_ecosystem

from tests.conftest import Pmx, app_path, free_port, wait_until
from tests.mounts import fill, mount, umount

SAVED = re.compile(r"saved (\d+) apps to (\S+)")


def write_ecosystem(pmx: Pmx, port: int) -> Path:
    return pmx.write("eco.toml", f"""
[[apps]]
name = "web"
script = "{app_path("pid_server.py")}"
exec_mode = "cluster"
instances = 2
listen = "127.0.0.1:{port}"
kill_timeout = "3s"

[[apps]]
name = "printer"
script = "{app_path("printer.py")}"
args = ["2"]
max_memory_restart = "200M"
env = {{ GREETING = "hello", API_TOKEN = "s3cret" }}
""")


def start_both(pmx: Pmx, port: int) -> None:
    pmx.run("start", str(write_ecosystem(pmx, port)))
    pmx.wait_status("web", "online", count=2)
    pmx.wait_status("printer", "online", count=1)


def spec(pmx: Pmx, name: str) -> dict[str, Any]:
    (app,) = json.loads(pmx.run("describe", name, "--json", "--show-secrets").stdout)
    assert isinstance(app["spec"], dict)
    return app["spec"]


def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        return str(response.read().decode())


def save(pmx: Pmx, *args: str) -> tuple[int, Path]:
    result = pmx.run("save", *args)
    match = SAVED.search(result.stdout)
    assert match, result.stdout
    return int(match.group(1)), Path(match.group(2))


def test_save_then_resurrect_restores_the_same_apps(pmxd: Pmx) -> None:
    port = free_port()
    start_both(pmxd, port)
    before = {name: spec(pmxd, name) for name in ("web", "printer")}

    count, dump = save(pmxd)
    assert (count, dump) == (2, pmxd.home / "dump.toml")
    assert (dump.stat().st_mode & 0o777) == 0o600
    parsed = {app.name: app for app in parse_ecosystem(dump)}
    assert set(parsed) == {"web", "printer"}
    assert parsed["web"].instances == 2 and parsed["web"].exec_mode == "cluster"
    assert dict(parsed["printer"].env) == {"GREETING": "hello", "API_TOKEN": "s3cret"}

    old_pids = set(pmxd.pids("web") + pmxd.pids("printer"))
    pmxd.run("kill")
    result = pmxd.run("resurrect")
    assert "started" in result.stdout
    rows = pmxd.wait_status("web", "online", count=2)
    pmxd.wait_status("printer", "online", count=1)
    assert {name: spec(pmxd, name) for name in ("web", "printer")} == before
    assert not old_pids & set(pmxd.pids("web") + pmxd.pids("printer"))
    web_pids = {row["pid"] for row in rows}
    answer = wait_until(lambda: (_answer_pid(port) in web_pids, _answer_pid(port)), timeout=10,
                        what=f"a resurrected web instance answers on port {port}")
    assert answer in web_pids


def _answer_pid(port: int) -> int | None:
    try:
        return int(get(port).split()[1])
    except (OSError, ValueError, IndexError):
        return None


def test_second_save_keeps_the_previous_dump_as_bak(pmxd: Pmx) -> None:
    start_both(pmxd, free_port())
    _, dump = save(pmxd)
    first = dump.read_bytes()
    pmxd.run("scale", "web", "3")
    pmxd.wait_status("web", "online", count=3)
    save(pmxd)
    assert (pmxd.home / "dump.toml.bak").read_bytes() == first
    assert dump.read_bytes() != first
    assert {app.name: app.instances for app in parse_ecosystem(dump)}["web"] == 3
    assert not list(pmxd.home.glob(".dump.toml.*"))  # no temporary file left behind


def test_saving_nothing_over_a_saved_list_needs_force(pmxd: Pmx) -> None:
    start_both(pmxd, free_port())
    _, dump = save(pmxd)
    saved = dump.read_bytes()
    pmxd.run("delete", "all")
    refused = pmxd.run("save", check=False)
    assert refused.returncode != 0
    assert "--force" in refused.stderr and "Traceback" not in refused.stderr
    assert dump.read_bytes() == saved
    count, _ = save(pmxd, "--force")
    assert count == 0
    assert (pmxd.home / "dump.toml.bak").read_bytes() == saved


def test_resurrect_after_saving_an_empty_list_starts_nothing(pmxd: Pmx) -> None:
    save(pmxd, "--force")
    result = pmxd.run("resurrect", check=False)
    assert result.returncode == 0, result.stderr
    assert pmxd.list() == []


# ---------------------------------------------------------------- a dump that cannot be written






@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """A read-only bind mount over `path` (root can write into a chmod 500 folder)."""
    mount("--bind", str(path), str(path))
    try:
        mount("-o", "remount,ro,bind", str(path))
        yield
    finally:
        umount(path)




def assert_failed_save_left_the_dump(pmx: Pmx, dump: Path, saved: bytes, reason: str) -> None:
    result = pmx.run("save", check=False)
    assert result.returncode == 1, result.stdout
    assert f"cannot write {dump}" in result.stderr and reason in result.stderr
    assert "Traceback" not in result.stderr
    assert dump.read_bytes() == saved
    assert not list(pmx.home.glob(".dump.toml.*"))


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount")


@needs_root
def test_save_into_a_read_only_home_fails_and_keeps_the_dump(pmxd: Pmx) -> None:
    pmxd.run("start", app_path("printer.py"), "--name", "printer", "--", "1")
    pmxd.wait_status("printer", "online")
    _, dump = save(pmxd)
    saved = dump.read_bytes()
    with read_only(pmxd.home):
        assert_failed_save_left_the_dump(pmxd, dump, saved, "Read-only file system")
    assert pmxd.pids("printer")  # the daemon and its app carry on


@needs_root
def test_save_onto_a_full_disk_fails_and_keeps_the_dump(pmx: Pmx) -> None:
    home = pmx.home
    mount("-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(home))
    try:
        pmx.start_daemon()
        pmx.run("start", app_path("printer.py"), "--name", "printer", "--", "1")
        pmx.wait_status("printer", "online")
        _, dump = save(pmx)
        saved = dump.read_bytes()
        filler = fill(home)
        try:
            assert_failed_save_left_the_dump(pmx, dump, saved, "No space left on device")
        finally:
            filler.unlink()
        assert save(pmx)[0] == 1  # room again: saving works
    finally:
        problems = pmx.cleanup()
        umount(home)
    assert not problems, problems
