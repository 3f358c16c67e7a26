"""pmxd as an OS service: `pmx startup`/`unstartup`, systemd's notify protocol, container mode.

The unit is checked as text and, when systemd-analyze is installed, by systemd itself.
Installing is exercised against a fake systemctl (a script on PATH that records its
arguments) in a scratch unit folder, so no test touches the machine's own systemd.
"""

from __future__ import annotations

import dataclasses
import os
import plistlib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pmx.cli import startup

from tests.conftest import CLI, Pmx, app_path, pid_alive, wait_until

DAEMON = [sys.executable, "-m", "pmx.supervisor.pmxd"]
IS_ROOT = os.geteuid() == 0
USER = pwd.getpwuid(os.geteuid()).pw_name
UNIT_NAME = f"pmx-{USER}.service" if IS_ROOT else "pmx.service"
# What systemd-analyze says about a setting it rejects or ignores.
ANALYZE_PROBLEM = re.compile(r"fail|error|unknown|invalid|ignor|bad|not |missing|deprecat", re.I)


def unit_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def print_unit(pmx: Pmx, *args: str) -> str:
    result = pmx.run("startup", *args, "--print")
    assert "Traceback" not in result.stderr
    return result.stdout


# ---------------------------------------------------------------- the unit as text


def test_systemd_unit_has_the_service_settings(pmx: Pmx) -> None:
    lines = unit_lines(print_unit(pmx, "systemd"))
    for expected in ("[Unit]", "[Service]", "[Install]", "Type=notify", "NotifyAccess=main",
                     "KillMode=mixed", "Restart=on-failure", f"Environment=PMX_HOME={pmx.home}"):
        assert expected in lines, f"{expected!r} missing from the unit:\n" + "\n".join(lines)
    exec_start = [line for line in lines if line.startswith("ExecStart=")]
    assert len(exec_start) == 1
    match = re.fullmatch(r"ExecStart=(/\S+) --foreground --resurrect", exec_start[0])
    assert match, exec_start
    pmxd = Path(match.group(1))
    assert pmxd.name == "pmxd" and os.access(pmxd, os.X_OK)
    stop = [line for line in lines if line.startswith("TimeoutStopSec=")]
    assert stop and int(stop[0].removeprefix("TimeoutStopSec=").removesuffix("s")) >= 60
    path_line = next(line for line in lines if line.startswith("Environment=PATH="))
    assert path_line.removeprefix("Environment=PATH=").split(":")[0] == str(pmxd.parent)
    if IS_ROOT:
        assert f"User={USER}" in lines and any(line.startswith("Group=") for line in lines)
        assert "LimitNOFILE=1048576" in lines
        assert "WantedBy=multi-user.target" in lines
    else:
        assert "WantedBy=default.target" in lines


def test_user_unit_has_no_account_and_no_fd_limit_above_the_user_manager() -> None:
    # A user manager cannot raise the hard fd limit (usually 524288): LimitNOFILE=1048576
    # in a user unit would make every start fail, so only system units carry it.
    service = startup.describe_service("systemd", pmx_home="/tmp/pmx-unit")
    text = startup.unit_text(dataclasses.replace(service, is_system=False))
    lines = unit_lines(text)
    assert not any(line.startswith(("User=", "Group=", "LimitNOFILE=", "After=network"))
                   for line in lines), text
    assert "WantedBy=default.target" in lines and "Type=notify" in lines
    assert not re.search(r"@[A-Z_]+@", text)  # every placeholder filled


def test_unit_quotes_paths_with_spaces_and_percent_signs() -> None:
    service = startup.describe_service("systemd", pmx_home="/tmp/pmx home/100%")
    text = startup.unit_text(service, Path("/opt/my tools/bin/pmxd"))
    assert 'Environment="PMX_HOME=/tmp/pmx home/100%%"' in text.splitlines()
    assert 'ExecStart="/opt/my tools/bin/pmxd" --foreground --resurrect' in text.splitlines()


def _analyze_problems(unit: Path, *extra: str) -> list[str]:
    result = subprocess.run(["systemd-analyze", *extra, "verify", str(unit)],
                            capture_output=True, text=True, timeout=60)
    output = (result.stdout + result.stderr).splitlines()
    return [line for line in output if unit.name in line and ANALYZE_PROBLEM.search(line)]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_accepts_the_unit(pmx: Pmx, tmp_path: Path) -> None:
    unit = tmp_path / "pmx.service"
    unit.write_text(print_unit(pmx, "systemd"))
    assert _analyze_problems(unit) == []
    # The filter above must be able to see a problem, or it proves nothing.
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("KillMode=mixed", "KillMode=gently"))
    assert _analyze_problems(broken), "systemd-analyze did not flag KillMode=gently"


def test_launchd_plist_is_a_valid_property_list(pmx: Pmx) -> None:
    plist = plistlib.loads(print_unit(pmx, "launchd").encode())
    assert plist["Label"] == f"pmx.{USER}"
    program, *args = plist["ProgramArguments"]
    assert Path(program).name == "pmxd" and args == ["--foreground", "--resurrect"]
    assert plist["EnvironmentVariables"]["PMX_HOME"] == str(pmx.home)
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["RunAtLoad"] is True and plist["ExitTimeOut"] >= 60
    assert ("UserName" in plist) == IS_ROOT


def test_startup_without_an_init_system_name_explains(pmx: Pmx) -> None:
    if Path("/run/systemd/system").is_dir() or sys.platform == "darwin":
        pytest.skip("this machine runs an init system pmx recognises")
    result = pmx.run("startup", check=False)  # --print needs no init system: it prints systemd's
    assert result.returncode == 1
    assert "pmx startup systemd" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------- installing (fake systemctl)


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    return folder


def fake_systemctl(folder: Path, *, exit_code: int = 0, message: str = "") -> Path:
    calls = folder / "calls"
    script = folder / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n'
                      + (f'echo "{message}" >&2\n' if message else "") + f"exit {exit_code}\n")
    script.chmod(0o755)
    return calls


def installer_env(pmx: Pmx, path: Path) -> dict[str, str]:
    return {**pmx.env, "PATH": str(path)}


def run_with(pmx: Pmx, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_startup_writes_enables_and_unstartup_removes(pmx: Pmx, fake_bin: Path,
                                                      tmp_path: Path) -> None:
    calls = fake_systemctl(fake_bin)
    units = tmp_path / "units"
    env = installer_env(pmx, fake_bin)
    result = run_with(pmx, env, "startup", "systemd", "--unit-dir", str(units))
    assert result.returncode == 0, result.stderr
    unit = units / UNIT_NAME
    assert f"wrote {unit}" in result.stdout
    assert (unit.stat().st_mode & 0o777) == 0o644
    assert "Type=notify" in unit.read_text()
    scope = "" if IS_ROOT else "--user "
    recorded = calls.read_text().splitlines()
    assert recorded == [f"{scope}daemon-reload", f"{scope}enable {UNIT_NAME}"]
    assert "pmx save" in result.stdout

    result = run_with(pmx, env, "unstartup", "systemd", "--unit-dir", str(units))
    assert result.returncode == 0, result.stderr
    assert not unit.exists() and f"removed {unit}" in result.stdout
    assert f"{scope}disable {UNIT_NAME}" in calls.read_text().splitlines()
    again = run_with(pmx, env, "unstartup", "systemd", "--unit-dir", str(units))
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_startup_without_systemctl_fails_cleanly(pmx: Pmx, fake_bin: Path,
                                                 tmp_path: Path) -> None:
    units = tmp_path / "units"
    result = run_with(pmx, installer_env(pmx, fake_bin), "startup", "systemd",
                      "--unit-dir", str(units))
    assert result.returncode == 1
    assert "systemctl is not installed here" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (units / UNIT_NAME).exists()


def test_refused_enable_keeps_the_previous_unit(pmx: Pmx, fake_bin: Path,
                                                tmp_path: Path) -> None:
    fake_systemctl(fake_bin, exit_code=1, message="Failed to enable unit: Access denied")
    units = tmp_path / "units"
    units.mkdir()
    (units / UNIT_NAME).write_text("# the unit from before\n")
    result = run_with(pmx, installer_env(pmx, fake_bin), "startup", "systemd",
                      "--unit-dir", str(units))
    assert result.returncode == 1
    assert "Access denied" in result.stderr and "Traceback" not in result.stderr
    assert (units / UNIT_NAME).read_text() == "# the unit from before\n"


# ---------------------------------------------------------------- pmxd under systemd's protocol


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    folder = tempfile.mkdtemp(prefix="pmxn-", dir="/tmp")  # unix socket paths stay short
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def receive_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    """Datagrams up to and including the first holding the line `wanted`."""
    __tracebackhide__ = True
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            continue
        seen.append(message)
        if wanted in message.splitlines():
            return seen
    pytest.fail(f"no {wanted} within {timeout}s; received {seen!r}")


class ForegroundDaemon:
    """`pmxd --foreground` as a child of the test, its output in files under the home."""

    def __init__(self, pmx: Pmx, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = pmx.home / "foreground.log"  # removed with the home
        with open(self.log, "wb") as err:
            self.process = subprocess.Popen([*DAEMON, "--foreground", *args],
                                            env=env or pmx.env, stdin=subprocess.DEVNULL,
                                            stdout=err, stderr=err, cwd=pmx.home)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pmxd did not exit within {timeout}s of SIGTERM:\n{self.output()}")

    def wait_answering(self, pmx: Pmx, timeout: float = 20) -> None:
        def probe() -> tuple[bool, str]:
            if self.process.poll() is not None:
                pytest.fail(f"pmxd exited {self.process.returncode}:\n{self.output()}")
            result = pmx.run("ping", check=False, timeout=10)
            return result.returncode == 0, result.stderr.strip()
        wait_until(probe, timeout=timeout, what="pmxd --foreground answers `pmx ping`")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
            pytest.fail(f"pmxd --foreground was still running:\n{self.output()}")


def test_notify_ready_once_the_control_socket_answers(
        pmx: Pmx, notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    daemon = ForegroundDaemon(pmx, "--home", str(pmx.home),
                              env={**pmx.env, "NOTIFY_SOCKET": path})
    try:
        messages = receive_until(sock, "READY=1", timeout=20)
        # Right away, with no retry: systemd starts dependent units at this moment.
        ping = pmx.run("ping", check=False, timeout=10)
        assert ping.returncode == 0, f"READY=1 came before pmxd answered: {ping.stderr}"
        assert f"pid {daemon.process.pid}" in ping.stdout
        assert f"MAINPID={daemon.process.pid}" in messages[-1].splitlines()
        daemon.process.send_signal(signal.SIGTERM)
        receive_until(sock, "STOPPING=1", timeout=20)
        assert daemon.process.wait(30) == 0, daemon.output()
    finally:
        daemon.close()


WORKER = Path(__file__).parents[2] / "config-examples" / "apps" / "worker.py"


def run_in_container_mode(pmx: Pmx, script: Path) -> tuple[int, str]:
    """`pmxd --foreground FILE` as a container runs it, then SIGTERM as `docker stop` sends."""
    ecosystem = pmx.write("eco.toml", f'[[apps]]\nname = "app"\nscript = "{script}"\n'
                          'args = ["3"]\nkill_timeout = "3s"\n')
    daemon = ForegroundDaemon(pmx, str(ecosystem))
    try:
        daemon.wait_answering(pmx)
        rows = pmx.wait_status("app", "online")
        app_pid = rows[0]["pid"]
        assert pid_alive(app_pid)
        status = daemon.terminate()
        wait_until(lambda: (not pid_alive(app_pid), app_pid), timeout=10,
                   what="the app's process is gone after pmxd exited")
        assert "Traceback" not in daemon.output()
        return status, daemon.output()
    finally:
        daemon.close()


def test_container_mode_runs_a_file_and_stops_its_apps_on_sigterm(pmx: Pmx) -> None:
    status, output = run_in_container_mode(pmx, WORKER)  # exits 0 on SIGTERM
    assert status == 0, output


def test_sigterm_exit_status_ignores_how_the_stopped_apps_ended(pmx: Pmx) -> None:
    status, output = run_in_container_mode(pmx, Path(app_path("printer.py")))  # no handler
    assert status == 0, output


def test_resurrect_flag_starts_the_saved_apps_before_ready(
        pmx: Pmx, notify_socket: tuple[socket.socket, str]) -> None:
    """What the unit runs at boot: `pmxd --foreground --resurrect` after a `pmx save`."""
    ecosystem = pmx.write("eco.toml", f'[[apps]]\nname = "printer"\nscript = "{app_path("printer.py")}"\n'
                          'args = ["1"]\n')
    pmx.run("start", str(ecosystem))
    pmx.wait_status("printer", "online")
    pmx.run("save")
    pmx.run("kill")
    sock, path = notify_socket
    daemon = ForegroundDaemon(pmx, "--resurrect", env={**pmx.env, "NOTIFY_SOCKET": path})
    try:
        messages = receive_until(sock, "READY=1", timeout=20)
        assert "STATUS=supervising 1 apps" in messages[-1].splitlines()
        assert [row["name"] for row in pmx.list()] == ["printer"]
        pmx.wait_status("printer", "online")
        assert daemon.terminate() == 0, daemon.output()
    finally:
        daemon.close()


def test_unreadable_dump_does_not_keep_the_service_down(
        pmx: Pmx, notify_socket: tuple[socket.socket, str]) -> None:
    pmx.write("dump.toml", "this is not [toml\n")
    sock, path = notify_socket
    daemon = ForegroundDaemon(pmx, "--resurrect", env={**pmx.env, "NOTIFY_SOCKET": path})
    try:
        exited = wait_until(lambda: (daemon.process.poll() is not None or
                                     (pmx.home / "rpc.sock").exists(), daemon.process.poll()),
                            timeout=20, what="pmxd answered or exited")
        assert exited is None, f"pmxd exited {exited}:\n{daemon.output()}"
        receive_until(sock, "READY=1", timeout=20)
        assert daemon.terminate() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.terminate()
