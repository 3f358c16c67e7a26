"""What a new user trips on in the first hour with the CLI (issue 14, items 4-12 and the
friction list): messages that say what happened, options wherever they stand, several
targets, one row per slot during a reload, colours in `pmx logs`, `describe` in units.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pmx.supervisor.options import OPTIONS

from tests.conftest import CLI, Pmx, app_path, free_port, pid_alive, pid_cluster_toml, wait_until
from tests.integration.hostile_helpers import read_pty

CLIENT_TIMEOUT_S = 5.0  # cli/client.py DEFAULT_TIMEOUT_S: what a dead pmxd used to cost


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single `pmx: ...` line of a failed command (and nothing on stdout)."""
    __tracebackhide__ = True
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pmx: "), result.stderr
    return lines[0]


def no_daemon(pmx: Pmx) -> bool:
    return not (pmx.home / "pmxd.pid").exists() and not (pmx.home / "rpc.sock").exists()


def eco(pmx: Pmx, body: str, name: str = "eco.toml") -> Path:
    return pmx.write(name, body)


def idle_app(name: str, *, instances: int = 1, extra: str = "") -> str:
    return f"""
[[apps]]
name = "{name}"
script = "{app_path('idle.py')}"
instances = {instances}
{extra}
"""


# ---------------------------------------------------------------- 5. pmx start missing.py


@pytest.mark.parametrize("target", ["missing.py", "./bin/nosuch", "/nonexistent/pmx/server",
                                    "app.js", "run.sh"])
def test_start_of_a_missing_script_says_no_such_file_and_starts_no_daemon(
        pmx: Pmx, target: str) -> None:
    result = pmx.run("start", target, check=False, cwd=pmx.home)
    assert one_line_error(result, 2) == f"pmx: {target}: no such file"
    assert no_daemon(pmx)


def test_start_of_an_unknown_name_still_asks_the_daemon(pmxd: Pmx) -> None:
    result = pmxd.run("start", "nosuchapp", check=False)
    assert one_line_error(result, 2) == 'pmx: no app or instance id "nosuchapp"'


# ---------------------------------------------------------------- 6. options after the script


def test_unknown_option_after_the_script_is_an_error_with_a_suggestion(pmx: Pmx) -> None:
    result = pmx.run("start", app_path("idle.py"), "--nmae", "foo", "--watch", check=False)
    assert one_line_error(result, 2) == "pmx: no such option --nmae; did you mean --name?"
    assert no_daemon(pmx)


def test_pmx_options_after_the_script_are_read_and_only_what_follows_dashes_goes_to_the_app(
        pmx: Pmx) -> None:
    pmx.run("start", app_path("printer.py"), "--name", "pr", "--", "3", "--name", "x")
    described = json.loads(pmx.run("describe", "pr", "--json").stdout)
    assert described[0]["spec"]["args"] == ["3", "--name", "x"]
    pmx.run("start", app_path("idle.py"), "-i", "2", "--no-preload", "--name", "two")
    assert len(pmx.wait_status("two", "online", count=2)) == 2


def test_a_stray_argument_before_dashes_is_refused_with_the_way_to_pass_it(pmx: Pmx) -> None:
    result = pmx.run("start", app_path("idle.py"), "extra", check=False)
    line = one_line_error(result, 2)
    assert '"extra"' in line and "after --" in line, line
    assert no_daemon(pmx)


def test_app_arguments_with_an_ecosystem_file_are_refused(pmx: Pmx) -> None:
    path = eco(pmx, idle_app("quiet"))
    line = one_line_error(pmx.run("start", str(path), "--", "x", check=False), 2)
    assert "--" in line and "script" in line, line
    line = one_line_error(pmx.run("start", app_path("idle.py"), "--env", "prod", check=False), 2)
    assert "--env" in line and "ecosystem" in line, line
    assert no_daemon(pmx)


# ---------------------------------------------------------------- 7. pmx scale api -1


def test_scale_takes_minus_one_plus_two_and_a_number(pmx: Pmx) -> None:
    pmx.run("start", str(eco(pmx, idle_app("work", instances=3))))
    pmx.wait_status("work", "online", count=3)
    result = pmx.run("scale", "work", "-1")
    assert "work scaled to 2 instances" in result.stdout
    pmx.wait_status("work", "online", count=2)
    pmx.run("scale", "work", "+2")
    pmx.wait_status("work", "online", count=4)
    pmx.run("scale", "work", "1")
    pmx.wait_status("work", "online", count=1)
    line = one_line_error(pmx.run("scale", "work", "lots", check=False), 2)
    assert "6, +2 or -1" in line, line


# ---------------------------------------------------------------- 8. a SIGKILLed pmxd


def test_commands_after_pmxd_was_killed_say_at_once_that_it_is_not_running(pmxd: Pmx) -> None:
    pid = pmxd.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: (not pid_alive(pid), pid), timeout=10, what="pmxd gone")
    for command in (["list"], ["stop", "web"], ["ping"], ["describe", "web"]):
        began = time.monotonic()
        result = pmxd.run(*command, check=False)
        took = time.monotonic() - began
        line = one_line_error(result, 3)
        assert line == (f"pmx: pmxd is not running (home {pmxd.home}); "
                        "start it with pmx start or pmxd"), line
        assert took < CLIENT_TIMEOUT_S, f"pmx {command[0]} took {took:.1f}s"
    assert "is not running" in pmxd.run("kill").stdout
    started = pmxd.run("start", app_path("idle.py"), "--name", "back")
    assert "started pmxd" in started.stderr
    pmxd.wait_status("back", "online")


def test_a_pid_file_naming_a_live_process_without_the_lock_is_not_a_daemon(pmxd: Pmx) -> None:
    pid = pmxd.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: (not pid_alive(pid), pid), timeout=10, what="pmxd gone")
    (pmxd.home / "pmxd.pid").write_text(f"{os.getpid()}\n")  # a recycled pid: alive, not pmxd
    try:
        began = time.monotonic()
        line = one_line_error(pmxd.run("list", check=False), 3)
        assert "is not running" in line and time.monotonic() - began < CLIENT_TIMEOUT_S, line
    finally:
        (pmxd.home / "pmxd.pid").unlink()


# ---------------------------------------------------------------- 9. resurrect, start again


def test_second_resurrect_says_nothing_started(pmx: Pmx) -> None:
    pmx.run("start", str(eco(pmx, idle_app("web") + idle_app("worker"))))
    pmx.wait_status("web", "online")
    pmx.run("save")
    result = pmx.run("resurrect")
    assert "[pmx] resurrect: web, worker already running; nothing to start" in result.stdout
    assert "started:" not in result.stdout
    pmx.run("stop", "worker")
    pmx.wait_status("worker", "stopped")
    result = pmx.run("resurrect")
    assert "[pmx] started: worker" in result.stdout, result.stdout
    assert "[pmx] resurrect: web already running" in result.stdout, result.stdout


def test_resurrect_without_a_dump_says_run_save_first(pmxd: Pmx) -> None:
    result = pmxd.run("resurrect", check=False)
    assert one_line_error(result, 1) == (f"pmx: no dump at {pmxd.home / 'dump.toml'}; "
                                         "run pmx save first")
    assert result.stdout == ""


def test_resurrect_of_a_corrupt_dump_is_a_bad_config_file(pmxd: Pmx) -> None:
    (pmxd.home / "dump.toml").write_text("[[apps]\nname = 'x'\n")
    line = one_line_error(pmxd.run("resurrect", check=False), 2)
    assert "dump.toml" in line and "invalid TOML" in line, line


def test_start_of_an_online_app_says_it_is_already_running(pmx: Pmx) -> None:
    pmx.run("start", app_path("idle.py"), "--name", "idle")
    pid = pmx.wait_status("idle", "online")[0]["pid"]
    for target in (app_path("idle.py"), "idle"):
        args = ("--name", "idle") if target != "idle" else ()
        result = pmx.run("start", target, *args)
        assert re.search(rf"\[pmx\] idle is already running \(pid {pid}, up \d+\w\); "
                         r"pmx restart idle or pmx reload idle", result.stdout), result.stdout
        assert "started:" not in result.stdout
    assert pmx.pids("idle") == [pid]


# ---------------------------------------------------------------- 10. one instance's label


def test_stop_of_an_instance_id_names_the_instance(pmx: Pmx) -> None:
    pmx.run("start", str(eco(pmx, idle_app("web", instances=2))))
    rows = pmx.wait_status("web", "online", count=2)
    result = pmx.run("stop", str(rows[0]["id"]))
    assert "[pmx] stopped: web:0" in result.stdout, result.stdout
    result = pmx.run("restart", str(rows[1]["id"]))
    assert "[pmx] restarted: web:1" in result.stdout, result.stdout


# ---------------------------------------------------------------- 4. list during a reload

GATED_READY = """
import os, pathlib, socket, sys, time
gate = pathlib.Path(sys.argv[1])
while gate.read_text().strip() != "go":
    time.sleep(0.05)
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
    path = os.environ["NOTIFY_SOCKET"]
    sock.sendto(b"READY=1", "\\0" + path[1:] if path.startswith("@") else path)
while True:
    time.sleep(3600)
"""


def test_list_during_a_reload_shows_one_row_per_slot(pmx: Pmx) -> None:
    gate = pmx.write("gate", "go")
    script = pmx.write("gated.py", GATED_READY)
    pmx.run("start", str(eco(pmx, f"""
[[apps]]
name = "gated"
script = "{script}"
args = ["{gate}"]
wait_ready = true
listen_timeout = "60s"
""")))
    old = pmx.wait_status("gated", "online")[0]
    gate.write_text("wait")
    reload = subprocess.Popen([*CLI, "reload", "gated"], env=pmx.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        rows = wait_until(lambda: (len(rows := pmx.instances("gated")) == 2, rows), timeout=20,
                          what="the replacement listed")
        replacement = [row for row in rows if row.get("replacement") is True]
        assert len(replacement) == 1 and replacement[0]["status"] == "launching", rows
        assert next(row for row in rows if not row.get("replacement"))["pid"] == old["pid"]
        table = pmx.run("list").stdout
        slot_rows = [line for line in table.splitlines() if re.match(r"\s*\d+\s+gated:0", line)]
        assert len(slot_rows) == 1 and "replacing" in slot_rows[0], table
        assert re.search(rf"^gated:0 replacing: pid {old['pid']} -> pid "
                         rf"{replacement[0]['pid']} \(launching\)$", table, re.M), table
    finally:
        gate.write_text("go")
        _, err = reload.communicate(timeout=60)
    assert reload.returncode == 0, err
    assert pmx.wait_status("gated", "online", count=1)[0]["pid"] != old["pid"]


# ---------------------------------------------------------------- 11. merged logs


def test_merged_log_lines_are_labelled_with_the_app_only(pmx: Pmx) -> None:
    pmx.run("start", str(eco(pmx, f"""
[[apps]]
name = "chatty"
script = "{app_path('printer.py')}"
args = ["2"]
instances = 2
merge_logs = true
""")))
    pmx.wait_status("chatty", "online", count=2)
    log = pmx.home / "logs" / "chatty-out.log"
    wait_until(lambda: (log.exists() and log.read_text().count("done") == 2,
                        log.read_text() if log.exists() else None),
               timeout=20, what="both instances logged")
    shown = pmx.run("logs", "chatty", "--nostream", "--lines", "20").stdout
    lines = [line for line in shown.splitlines() if "line " in line or "done" in line]
    assert len(lines) == 6, shown
    assert all(line.startswith("chatty | ") for line in lines), shown


# ---------------------------------------------------------------- 12. startup --print


def test_startup_print_needs_no_running_init_system(pmx: Pmx) -> None:
    result = pmx.run("startup", "--print")
    assert "ExecStart=" in result.stdout and "Type=notify" in result.stdout, result.stdout
    assert no_daemon(pmx)


# ---------------------------------------------------------------- friction: errors


@pytest.mark.parametrize(("argv", "expected"), [
    (["start"], r"^pmx: missing argument TARGET; see pmx start --help$"),
    (["stop", "--bogus"], r"^pmx: no such option --bogus"),
    # An unknown command is quoted as names are (`no app or instance id "x"`), in a
    # subgroup too.
    (["nosuchcommand"], r'^pmx: no such command "nosuchcommand"; see pmx --help$'),
    (["lsit"], r'^pmx: no such command "lsit"; did you mean "list"\?$'),
    (["export", "helm", "eco.toml"], r'^pmx: no such command "helm"; see pmx export --help$'),
    (["export", "kubernete"], r'^pmx: no such command "kubernete"; did you mean "kubernetes"\?$'),
    (["logs", "--lines", "many"], r"^pmx: --lines: 'many' is not a valid integer"),
])
def test_usage_errors_are_one_line_with_exit_2(pmx: Pmx, argv: list[str], expected: str) -> None:
    line = one_line_error(pmx.run(*argv, check=False), 2)
    assert re.search(expected, line), line


def test_unknown_app_names_exit_2_as_the_readme_says(pmxd: Pmx) -> None:
    for command in ("stop", "restart", "reload", "delete", "describe", "logs"):
        line = one_line_error(pmxd.run(command, "nope", check=False), 2)
        assert line == 'pmx: no app or instance id "nope"', line


def test_readme_exit_code_table_matches_the_code() -> None:
    from pmx.supervisor.errors import ExitCode

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for code in ExitCode:
        assert re.search(rf"^\|\s*{int(code)}\s*\|", readme, re.M), f"exit {code} undocumented"


# ---------------------------------------------------------------- friction: what it did


def test_stop_says_what_it_did_and_start_shows_the_table(pmx: Pmx) -> None:
    started = pmx.run("start", str(eco(pmx, idle_app("web"))))
    assert re.search(r"web:0 .* online", started.stdout), started.stdout
    for command in ("stop", "restart", "reload"):
        result = pmx.run(command, "web")
        assert "[pmx]" in result.stdout and "uptime" not in result.stdout, result.stdout
    assert pmx.run("stop", "web", "--table").stdout.count("uptime") == 1


# ---------------------------------------------------------------- friction: several targets


def test_stop_restart_delete_take_several_targets(pmx: Pmx) -> None:
    pmx.run("start", str(eco(pmx, idle_app("a") + idle_app("b") + idle_app("c", instances=2))))
    for name in "ab":
        pmx.wait_status(name, "online")
    ids = [row["id"] for row in pmx.wait_status("c", "online", count=2)]
    result = pmx.run("stop", "a", "b")
    assert "[pmx] stopped: a, b" in result.stdout, result.stdout
    pmx.wait_status("a", "stopped")
    pmx.wait_status("b", "stopped")
    result = pmx.run("stop", *map(str, ids))  # two instances of one app: one operation
    assert "[pmx] stopped: c:0, c:1" in result.stdout, result.stdout
    pmx.run("restart", "a", "b", "c")
    for name in "abc":
        pmx.wait_status(name, "online")
    line = one_line_error(pmx.run("stop", "a", "nope", check=False), 2)
    assert '"nope"' in line
    assert pmx.wait_status("a", "online")  # nothing was stopped: the targets are checked first
    result = pmx.run("delete", "a", "b")
    assert "[pmx] deleted: a, b" in result.stdout
    assert {row["name"] for row in pmx.list()} == {"c"}


# ---------------------------------------------------------------- friction: colours in logs

COLOURFUL = r"""
import sys, time
sys.stdout.write("\x1b[31mred\x1b[0m plain \x1b[1;32mbold green\x1b[0m\n")
sys.stdout.write("clear \x1b[2J title \x1b]0;pwned\x07 up \x1b[3A end\n")
sys.stdout.write("done\n")
sys.stdout.flush()
while True:
    time.sleep(3600)
"""


def test_logs_on_a_terminal_keep_colours_and_neutralise_the_rest(pmx: Pmx) -> None:
    script = pmx.write("colourful.py", COLOURFUL)
    pmx.run("start", str(script), "--name", "colourful")
    log = pmx.home / "logs" / "colourful-out-0.log"
    wait_until(lambda: (log.exists() and "done" in log.read_text(), None), timeout=20,
               what="colourful logged")
    shown = read_pty([*CLI, "logs", "colourful", "--nostream"], pmx.env)
    assert b"\x1b[31mred\x1b[0m plain \x1b[1;32mbold green\x1b[0m" in shown, shown
    assert b"\x1b[2J" not in shown and b"\x1b]0;" not in shown and b"\x07" not in shown
    assert b"\x1b[3A" not in shown
    assert rb"clear \x1b[2J title \x1b]0;pwned\x07 up \x1b[3A end" in shown, shown
    piped = pmx.run("logs", "colourful", "--nostream").stdout  # not a terminal: as logged
    assert "\x1b[31mred" in piped and "\x1b[2J" in piped


# ---------------------------------------------------------------- friction: describe


def test_describe_shows_every_option_in_human_units(pmx: Pmx) -> None:
    pmx.run("start", str(eco(pmx, idle_app("big", extra='max_memory_restart = "200M"\n'
                                                        'kill_timeout = 5000'))))
    pmx.wait_status("big", "online")
    shown = pmx.run("describe", "big").stdout
    assert "209715200" not in shown, shown
    rows = {line.split()[0]: line for line in shown.splitlines() if line.split()}
    assert re.search(r"\b200M\b", rows["max_memory_restart"]), shown
    assert re.search(r"\b5s\b", rows["kill_timeout"]) and "5000" not in rows["kill_timeout"]
    assert re.search(r"^max_log_size\s+-\s", rows["max_log_size"]), shown
    for option in OPTIONS:
        assert option.name in rows, f"describe leaves {option.name} out:\n{shown}"
    spec = json.loads(pmx.run("describe", "big", "--json").stdout)[0]["spec"]
    assert spec["max_memory_restart"] == 209715200 and spec["kill_timeout"] == 5000


# ---------------------------------------------------------------- friction: --env, port


def test_unknown_env_profile_lists_the_known_ones(pmx: Pmx) -> None:
    path = eco(pmx, idle_app("api") + "[apps.env_production]\nA = '1'\n"
               + idle_app("web") + "[apps.env_staging]\nA = '2'\n")
    line = one_line_error(pmx.run("start", str(path), "--env", "nosuch", check=False), 2)
    assert line == f"pmx: {path}: no app has env_nosuch; known: production, staging", line
    assert no_daemon(pmx)
    pmx.run("start", str(path), "--env", "staging")  # one app defining it is enough
    pmx.wait_status("web", "online")


def test_port_shorthand_binds_every_interface_and_list_shows_it(pmx: Pmx) -> None:
    port = free_port()
    pmx.run("start", str(eco(pmx, f"""
[[apps]]
name = "open"
script = "{app_path('pid_server.py')}"
exec_mode = "cluster"
port = {port}
""")))
    pmx.wait_status("open", "online")
    assert f"0.0.0.0:{port}" in pmx.run("list").stdout
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert re.search(r"port = \d+.*0\.0\.0\.0", readme), "README: port binds all interfaces"


def test_pmx_alone_prints_the_help(pmx: Pmx) -> None:
    result = pmx.run()
    assert result.stdout.startswith("Usage: pmx") and "start" in result.stdout, result


def test_a_command_waiting_on_a_pmxd_that_dies_exits_3_at_once(pmx: Pmx) -> None:
    # Issue 16 item 11: a reload waits up to 600 s for its reply; it must not outlive pmxd.
    port = free_port()
    eco = pmx.write("slow.toml", pid_cluster_toml("slow", port, instances=2, extra=(
        'wait_ready = true\nlisten_timeout = "60s"\nenv = { NOTIFY = "0" }')))
    pmx.run("start", str(eco))
    daemon = pmx.daemon_pid()
    assert daemon is not None
    reload = subprocess.Popen([*CLI, "reload", "slow"], env=pmx.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        log = pmx.home / "pmxd.log"
        wait_until(lambda: ("launching" in log.read_text(), None), timeout=15,
                   what="the reload waiting for its replacement")
        os.kill(daemon, signal.SIGKILL)
        started = time.monotonic()
        _, stderr = reload.communicate(timeout=20)
        assert time.monotonic() - started < 10
        assert reload.returncode == 3 and "pmxd died while running reload" in stderr
    finally:
        if reload.poll() is None:
            reload.kill()
            reload.wait()
        pmx.start_daemon()  # a new pmxd stops what the killed one left; teardown stops it


def test_a_stopped_pmxd_is_named_as_not_answering(pmx: Pmx) -> None:
    # Issue 16 item 13: SIGSTOPped pmxd: say which pmxd does not answer, not "already running".
    pmx.start_daemon()
    daemon = pmx.daemon_pid()
    assert daemon is not None
    os.kill(daemon, signal.SIGSTOP)
    try:
        result = pmx.run("start", app_path("idle.py"), check=False, timeout=30)
        assert result.returncode == 3
        assert f"pmxd (pid {daemon}) did not answer" in result.stderr
        assert "stopped" in result.stderr and "already running" not in result.stderr
    finally:
        os.kill(daemon, signal.SIGCONT)


def test_an_oversized_request_is_refused_at_once_in_one_line(pmx: Pmx) -> None:
    # Issue 16 item 10: 11 env values of 100 KB made `pmx start` wait 60 s for nothing.
    pmx.start_daemon()
    for number in range(11):
        pmx.env[f"BIG_{number}"] = "x" * 100_000
    started = time.monotonic()
    result = pmx.run("start", app_path("idle.py"), check=False, timeout=60)
    assert time.monotonic() - started < 10
    assert result.returncode != 0
    assert "over pmx's 1,048,576 byte limit" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert pmx.run("ping").returncode == 0


def test_a_numeric_app_name_is_a_name_before_it_is_an_id(pmx: Pmx) -> None:
    # Issue 17 item 3, as PM2 (its issue #1937): `--name 455` is accepted, and a target is
    # looked up as a name first. Here app "1" exists while id 1 is another app's instance.
    pmx.run("start", app_path("idle.py"), "--name", "first")  # id 0
    pmx.run("start", app_path("idle.py"), "--name", "other")  # id 1
    pmx.run("start", app_path("idle.py"), "--name", "1")      # id 2
    result = pmx.run("stop", "1")
    assert "stopped: 1" in result.stdout
    statuses = {row["name"]: row["status"] for row in pmx.list()}
    assert statuses == {"first": "online", "other": "online", "1": "stopped"}
