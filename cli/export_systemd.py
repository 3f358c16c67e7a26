"""`pmx export systemd`: a template unit per app (`NAME@.service`, instances NAME@0 ..
NAME@N-1), a socket unit for a cluster app, env files for secrets, a timer for
`cron_restart`.

A cluster app's `listen` addresses become a socket unit that systemd binds once and
passes to every instance as fd 3 (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES: what pmx apps
already read), kept open across restarts as pmxd keeps it; with `reuse_port` it is a
template socket, one SO_REUSEPORT socket per instance. `{instance}` is `%i`.

Unit files are written by `UnitWriter`, which quotes every value by systemd's rules
(systemd.syntax(7), systemd.service(5) "Command lines"): `%` is a specifier, `$` expands
in command lines, quotes take C escapes; a value pmx cannot quote exactly is refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pmx.supervisor.config import MASK
from pmx.supervisor.errors import ConfigError

from .export_common import (
    GENERATED_BY,
    ExportApp,
    OutFile,
    Report,
    comment,
    is_env_name,
    new_report,
    program,
    seconds_text,
    secret_note,
    size_text,
    split_env,
    tcp_ports,
    unique_names,
)
from .export_cron import to_on_calendar

TARGET = "systemd"
ENV_DIR = "/etc/pmx"  # where the units look for NAME.env (secrets, 0600)
MAPPED = frozenset({
    "name", "script", "args", "interpreter", "interpreter_args", "cwd", "env", "instances",
    "exec_mode", "listen", "reuse_port", "user", "group", "autorestart", "restart_delay", "reload_mode",
    "kill_timeout", "stop_signal", "wait_ready", "listen_timeout", "max_memory_restart", "cron_restart",
})
_LOGS = "the journal keeps stdout and stderr (journalctl -u NAME@0); StandardOutput=append:FILE for a file"
REASONS = {
    "preload": "pmx's preloads run only under pmxd; under systemd declare listen (a socket unit)",
    "max_restarts": "systemd's StartLimitBurst= counts starts in a time window, not unstable runs",
    "min_uptime": "systemd's StartLimitIntervalSec= counts starts in a time window, not uptime",
    "exp_backoff_restart_delay": "RestartSteps= (systemd 254+) grows the delay another way",
    "shutdown_with_message": "a Node IPC message of pmx's; systemd sends the stop signal",
    "ready_check": "systemd has no probes: use wait_ready (Type=notify)",
    "memory_limit_samples": "the kernel acts at MemoryMax= at once",
    "out_file": _LOGS, "error_file": _LOGS, "merge_logs": _LOGS, "log_date_format": _LOGS,
    "max_log_size": "journald rotates the journal", "retain": "journald rotates the journal",
    "watch": "a host fleet is deployed, not watched: restart the units after a deployment",
    "ignore_watch": "see watch", "watch_delay": "see watch",
}
_SAFE = re.compile(r"[A-Za-z0-9_./:=@+,-]+")
_UNIT_NAME = re.compile(r"[^A-Za-z0-9:_.-]+")


def _escape_quoted(text: str) -> str:
    out = []
    for char in text:
        if char in '\\"':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif ord(char) < 32 or ord(char) == 127:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out).replace("%", "%%")


def exec_arg(arg: str) -> str:
    """One ExecStart= argument: `{instance}` becomes %i; %, $, quotes, blanks escaped."""
    pieces = []
    for piece in arg.split("{instance}"):
        text = piece if _SAFE.fullmatch(piece) else (_escape_quoted(piece) if piece else "")
        pieces.append(text.replace("$", "$$"))
    joined = "%i".join(pieces)
    return joined if _SAFE.fullmatch(arg.replace("{instance}", "x")) else f'"{joined}"'


def env_assignment(name: str, value: str, *, instance: bool = False) -> str:
    """One Environment= word: the whole assignment quoted ($ is not special there);
    `instance` makes the value the instance number (%i)."""
    return '"' + _escape_quoted(f"{name}={value}") + ("%i" if instance else "") + '"'


def env_file_line(name: str, value: str) -> str:
    """NAME="value" for an EnvironmentFile=: in double quotes \\, ", $ and ` are escaped."""
    escaped = "".join("\\" + char if char in '\\"$`' else char for char in value)
    return f'{name}="{escaped}"\n'


def plain(value: str) -> str:
    """A value for any other setting: specifiers escaped; a line break is refused."""
    if "\n" in value or "\r" in value:
        raise ConfigError(f"{value!r}: a systemd setting cannot hold a line break")
    return value.replace("%", "%%")


class UnitWriter:
    """A unit file, section by section, keys in the order they are added."""

    def __init__(self, header: Sequence[str] = ()) -> None:
        self._text = comment(header)
        self._section: str | None = None

    def section(self, name: str) -> None:
        self._text += ("\n" if self._text else "") + f"[{name}]\n"
        self._section = name

    def set(self, key: str, value: str) -> None:
        """`value` must already be escaped for its setting (exec_arg, env_assignment, plain)."""
        assert self._section is not None and "\n" not in value
        self._text += f"{key}={value}\n"

    def text(self) -> str:
        return self._text


@dataclass(frozen=True, slots=True)
class _Names:
    unit: str  # NAME in NAME@.service
    socket: str | None  # the socket unit's file name, for cluster apps with listen


def export(apps: list[ExportApp], source: str) -> tuple[list[OutFile], list[Report]]:
    units = unique_names(apps, lambda name: _UNIT_NAME.sub("-", name).strip("-") or "app")
    files: list[OutFile] = []
    reports = []
    for app in apps:
        report = new_report(app, MAPPED, REASONS, "systemd")
        unit = units[app.name]
        socket = None
        if app.spec.is_cluster and app.spec.listen:
            socket = f"{unit}@.socket" if app.spec.reuse_port else f"{unit}.socket"
        names = _Names(unit, socket)
        plain_env, secret = split_env(app.spec.env)
        timer = _timer(app, unit, report)
        body = _service(app, names, plain_env, secret, report)
        header = [GENERATED_BY.format(target=TARGET, source=source),
                  *_install_lines(app, names, secret), *report.lines()]
        files.append(OutFile(f"{unit}@.service", comment(header) + "\n" + body.text()))
        if socket is not None:
            files.append(OutFile(socket, _socket(app, unit)))
        if secret:
            files.append(OutFile(f"{unit}.env", "".join(env_file_line(k, v) for k, v in secret.items()),
                                 0o600, "".join(env_file_line(k, MASK) for k in secret)))
        files += timer
        reports.append(report)
    return files, reports


def _install_lines(app: ExportApp, names: _Names, secret: dict[str, str]) -> list[str]:
    unit = names.unit
    if app.is_max:
        instances = f"$(seq -f '{unit}@%g.service' 0 $(($(nproc) - 1)))"
        indexes = "$(seq 0 $(($(nproc) - 1)))"
    else:
        instances = " ".join(f"{unit}@{i}.service" for i in range(app.spec.instances))
        indexes = " ".join(str(i) for i in range(app.spec.instances))
    timer = [f"{unit}-restart.service", f"{unit}-restart.timer"] if app.spec.cron_restart else []
    files = " ".join([f"{unit}@.service", *([names.socket] if names.socket else []), *timer])
    sockets = "" if names.socket is None else (
        f"{names.socket} " if not app.spec.reuse_port else instances.replace(".service", ".socket") + " ")
    sockets += f"{unit}-restart.timer " if timer else ""
    lines = [f"Install: sudo install -m 0644 {files} /etc/systemd/system/"]
    if secret:
        lines.append(f"         sudo install -d -m 0700 {ENV_DIR} && "
                     f"sudo install -m 0600 {unit}.env {ENV_DIR}/")
    lines.append(f"         sudo systemctl daemon-reload && sudo systemctl enable --now {sockets}{instances}")
    lines.append(f"Reload one instance at a time: for i in {indexes}; do sudo systemctl restart "
                 f"{unit}@$i.service; done")
    return lines


def _service(app: ExportApp, names: _Names, plain_env: dict[str, str], secret: dict[str, str],
             report: Report) -> UnitWriter:
    spec = app.spec
    unit = UnitWriter()
    unit.section("Unit")
    unit.set("Description", plain(f"pmx app {spec.name}, instance ") + "%i")
    after = "network.target"
    if names.socket is not None:
        socket = names.socket.replace("@.", "@%i.")
        unit.set("Requires", socket)
        after = f"{socket} {after}"
    unit.set("After", after)
    unit.section("Service")
    if spec.wait_ready:
        unit.set("Type", "notify")
        unit.set("NotifyAccess", "all")  # pmx takes READY=1 from the app's whole group too
        unit.set("TimeoutStartSec", seconds_text(spec.listen_timeout_s))
    else:
        unit.set("Type", "exec")
        if app.sets("listen_timeout"):
            report.unmapped.append(("listen_timeout", "used as TimeoutStartSec= with wait_ready only"))
    ports = tcp_ports(spec)
    values = {"fd": "3", "port": str(ports[0]) if ports else "{port}"}
    argv = [*program(spec), *(_template(arg, values) for arg in spec.args)]
    if ports == [] and any("{port}" in arg for arg in spec.args):
        report.unmapped.append(("args", "{port} is learned at run time under pmxd; declare listen"))
    unit.set("ExecStart", " ".join(exec_arg(arg) for arg in argv))
    unit.set("WorkingDirectory", plain(spec.cwd))
    environment = {**plain_env, "PMX_APP_NAME": spec.name, "PMX_INSTANCE": "", "NODE_APP_INSTANCE": ""}
    if ports:
        environment["PORT"] = str(ports[0])
    for name in sorted(environment):
        if is_env_name(name):
            unit.set("Environment", env_assignment(name, environment[name],
                                                   instance=name in ("PMX_INSTANCE", "NODE_APP_INSTANCE")))
        else:
            report.unmapped.append(("env", f"{name}: systemd takes letters, digits and _ only"))
    if secret:
        unit.set("EnvironmentFile", plain(f"{ENV_DIR}/{names.unit}.env"))
        report.notes.append(secret_note(secret, "looks secret: it goes", "look secret: they go")
                            + f" to {names.unit}.env (mode 0600, in {ENV_DIR}), not into the unit")
    if names.socket is not None:
        unit.set("Sockets", names.socket.replace("@.", "@%i."))
        if any("{fd}" in arg for arg in spec.args):
            # As pmx does: an app told its fd by argument must not adopt it by LISTEN_FDS too.
            unit.set("UnsetEnvironment", "LISTEN_FDS LISTEN_PID LISTEN_FDNAMES")
    elif spec.is_cluster:
        report.notes.append("cluster mode without listen: every instance binds the port itself "
                            "under systemd; declare listen for a shared socket unit")
    if spec.user:
        unit.set("User", plain(spec.user))
    if spec.group:
        unit.set("Group", plain(spec.group))
    unit.set("Restart", "always" if spec.autorestart else "no")
    if app.sets("restart_delay"):
        unit.set("RestartSec", seconds_text(spec.restart_delay_s))
    unit.set("KillSignal", spec.stop_signal)
    unit.set("KillMode", "mixed")  # as pmx: the signal to the app, SIGKILL to all that is left
    unit.set("TimeoutStopSec", seconds_text(spec.kill_timeout_s))
    if spec.max_memory_restart_bytes is not None:
        unit.set("MemoryMax", str(size_text(spec.max_memory_restart_bytes, {"K": "K", "M": "M", "G": "G"})))
        report.notes.append("max_memory_restart: MemoryMax= makes the kernel kill the instance at "
                            "the limit (pmx restarted it gracefully)")
    if spec.reload_mode == "overlap" and app.sets("reload_mode"):
        report.unmapped.append(("reload_mode", "a unit restarts stop-then-start; the socket unit "
                                               "keeps connections waiting meanwhile"))
    unit.section("Install")
    unit.set("WantedBy", "multi-user.target")
    return unit


def _template(arg: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg  # {instance} is left for exec_arg, which makes it %i


def _socket(app: ExportApp, unit_name: str) -> str:
    spec = app.spec
    unit = UnitWriter([f"The listening sockets of pmx app {spec.name}: bound once by systemd, passed "
                       "to every instance as fd 3 onwards (LISTEN_FDS)"])
    unit.section("Unit")
    unit.set("Description", plain(f"pmx app {spec.name}: listening sockets"))
    unit.section("Socket")
    for address in spec.listen:
        unit.set("ListenStream", plain(address.removeprefix("unix:")))
    if spec.reuse_port:
        unit.set("ReusePort", "yes")
    else:
        unit.set("Service", f"{unit_name}@0.service")  # a connection before any start starts :0
    unit.set("FileDescriptorName", unit_name if len(spec.listen) > 1 else f"{unit_name}-0")
    unit.section("Install")
    unit.set("WantedBy", "sockets.target")
    return unit.text()


def _timer(app: ExportApp, unit_name: str, report: Report) -> list[OutFile]:
    """`cron_restart` (a reload at those times): a timer whose service restarts the
    instances one after the other (a oneshot runs its ExecStart= lines in turn), while
    the socket unit keeps connections waiting."""
    cron = app.spec.cron_restart
    if not cron:
        return []
    calendar = to_on_calendar(cron)
    if calendar is None:
        report.unmapped.append(("cron_restart", f"{cron!r}: only five-field cron and @hourly .. "
                                                "@yearly convert to OnCalendar="))
        return []
    header = [f"cron_restart {cron!r} of pmx app {app.name}"]
    service = UnitWriter(header)
    service.section("Unit")
    service.set("Description", plain(f"restart pmx app {app.name} ({cron})"))
    service.section("Service")
    service.set("Type", "oneshot")
    # "max" has no count to list: every running instance at once, by pattern.
    targets = [f"{unit_name}@*.service"] if app.is_max else [
        f"{unit_name}@{index}.service" for index in range(app.spec.instances)]
    for target in targets:
        service.set("ExecStart", " ".join(exec_arg(arg) for arg in ["systemctl", "try-restart", target]))
    timer = UnitWriter(header)
    timer.section("Unit")
    timer.set("Description", plain(f"restart pmx app {app.name} ({cron})"))
    timer.section("Timer")
    for value in calendar:
        timer.set("OnCalendar", plain(value))
    timer.section("Install")
    timer.set("WantedBy", "timers.target")
    how = "all at once (instances = \"max\")" if app.is_max else "one at a time"
    report.notes.append(f"cron_restart {cron!r}: {unit_name}-restart.timer restarts the instances "
                        f"{how}, in local time; enable it with systemctl enable --now")
    return [OutFile(f"{unit_name}-restart.service", service.text()),
            OutFile(f"{unit_name}-restart.timer", timer.text())]
