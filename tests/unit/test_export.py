"""`pmx export kubernetes | systemd | compose`: the files validate offline against the real
schemas (kubernetes-validate, the compose specification's JSON schema that check-jsonschema
vendors, `systemd-analyze verify`), every option of the rich ecosystem lands where it
should or is reported as not mapped, and the output is deterministic."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pytest
import yaml
from pmx.cli import export_compose, export_kubernetes, export_systemd
from pmx.cli.export_common import OutFile, Report, load_apps, unmapped
from pmx.cli.export_cron import kubernetes_schedule, to_on_calendar
from pmx.cli.export_systemd import env_assignment, env_file_line, exec_arg
from pmx.supervisor import options as options_module
from pmx.supervisor.errors import ConfigError
from pmx.supervisor.options import OPTIONS

ROOT = Path(__file__).resolve().parents[2]
RICH = Path(__file__).parent / "export_fixtures" / "rich.toml"
EXAMPLES = [*sorted((ROOT / "config-examples").glob("*.toml")), ROOT / "packaging" / "ecosystem.toml"]
FILES = [*EXAMPLES, RICH]
CLI = [sys.executable, "-m", "pmx.cli.main"]
K8S = export_kubernetes.Options("registry.example.com/shop:1.0", "shop", "/app", 2,
                                "registry.k8s.io/kubectl:v1.33.0")
COMPOSE = export_compose.Options("registry.example.com/shop:1.0", "/app", 2)
SECRETS = ("t0k3n", "p'w", "k3y-v4lue")
Expect = object  # a value, or a predicate (a callable returning bool)


def kubernetes(path: Path) -> tuple[list[OutFile], list[Report]]:
    return export_kubernetes.export(load_apps(str(path)), K8S, path.name)


def systemd(path: Path) -> tuple[list[OutFile], list[Report]]:
    return export_systemd.export(load_apps(str(path)), path.name)


def compose(path: Path) -> tuple[list[OutFile], list[Report]]:
    return export_compose.export(load_apps(str(path)), COMPOSE, path.name)


TARGETS: dict[str, Callable[[Path], tuple[list[OutFile], list[Report]]]] = {
    "kubernetes": kubernetes, "systemd": systemd, "compose": compose}
MODULES = {"kubernetes": export_kubernetes, "systemd": export_systemd, "compose": export_compose}


def dig(value: object, path: str) -> object:
    for part in path.split(".") if path else []:
        if isinstance(value, list):
            value = value[int(part)]
        else:
            assert isinstance(value, dict), f"{part}: not a mapping in {value!r}"
            value = value.get(part)
    return value


def matches(found: object, expected: Expect) -> bool:
    return bool(expected(found)) if callable(expected) else found == expected


def k8s_objects(path: Path = RICH) -> dict[tuple[str, str], dict[str, object]]:
    """(kind, app label) -> object, from every file of the export."""
    objects = {}
    for file in kubernetes(path)[0]:
        for document in yaml.safe_load_all(file.text):
            labels = document["metadata"]["labels"]
            objects[(document["kind"], labels["app.kubernetes.io/name"])] = document
    return objects


def unit_settings(text: str) -> dict[str, list[str]]:
    """"Section.Key" -> its values, in order; "#" -> the comment lines."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        if line.startswith("#"):
            settings.setdefault("#", []).append(line)
        elif line.startswith("["):
            section = line.strip("[]")
        elif "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


# ---------------------------------------------------------------- the real schemas


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_kubernetes_manifests_validate_against_the_schemas(path: Path) -> None:
    import kubernetes_validate  # type: ignore[import-untyped]

    documents = [d for f in kubernetes(path)[0] for d in yaml.safe_load_all(f.text)]
    assert documents
    for version in ("1.30.0", kubernetes_validate.latest_version()):
        for document in documents:
            kubernetes_validate.validate(document, version, strict=True)


def compose_schema() -> dict[str, object]:
    files = resources.files("check_jsonschema.builtin_schemas") / "vendor" / "compose-spec.json"
    schema = json.loads(files.read_text(encoding="utf-8"))
    assert isinstance(schema, dict)
    return schema


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_compose_file_validates_against_the_compose_spec(path: Path) -> None:
    import jsonschema  # type: ignore[import-untyped]

    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    document = yaml.safe_load(compose(path)[0][0].text)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]
    assert errors == []
    assert list(document["services"]) == [app.name.lower() for app in load_apps(str(path))]


# systemd looks a bare command up in a fixed path, not in ours.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_systemd_units_pass_systemd_analyze_verify(path: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    files, _ = systemd(path)
    for file in files:
        (tmp_path / file.name).write_text(file.text)
    units = [f"./{f.name.replace('@.', '@0.')}" for f in files if not f.name.endswith(".env")]
    result = subprocess.run([analyze, "verify", "--man=no", *units], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    # Programs this machine lacks (gunicorn, node, ...) are the only complaint allowed.
    lines = (result.stdout + result.stderr).splitlines()
    problems = [line for line in lines if not _is_missing_program(line)]
    assert problems == []
    assert result.returncode == 0 or lines  # a failure always says why


def _is_missing_program(line: str) -> bool:
    found = re.search(r"Command (\S+) is not executable: No such file or directory", line)
    return found is not None and shutil.which(found.group(1), path=SYSTEMD_PATH) is None


# ---------------------------------------------------------------- where each option lands

C = "spec.template.spec.containers.0."
K8S_ROWS: list[tuple[str, tuple[str, ...], str, str, Expect]] = [
    ("api", ("name",), "Deployment", "metadata.name", "api"),
    ("edge-svc-v2", ("name",), "Service", "metadata.name", "edge-svc-v2"),
    ("api", ("script", "interpreter", "interpreter_args"), "Deployment", C + "command",
     ["python3", "-X", "dev", "server.py"]),
    ("edge-svc-v2", ("script", "interpreter"), "Deployment", C + "command", ["/usr/bin/env"]),
    ("api", ("args",), "Deployment", C + "args",
     ["--bind", "0.0.0.0:8080", "--name", "api-$(PMX_POD_NAME)", "--motto", "100% $$(HOME) \"quoted\" it's"]),
    ("edge-svc-v2", ("args",), "Deployment", C + "args", ["python3", "-m", "http.server", "9000"]),
    ("api", ("cwd",), "Deployment", C + "workingDir", "/app/srv"),
    ("api", ("env",), "Deployment", C + "env",
     lambda env: {"name": "LOG_LEVEL", "value": "info"} in env and {"name": "API_TOKEN", "valueFrom": {
         "secretKeyRef": {"name": "api-env", "key": "API_TOKEN"}}} in env
     and {"name": "GREETING", "value": "50% off $today"} in env),
    ("api", ("instances",), "Deployment", "spec.replicas", 2),  # "max": --max-instances
    ("edge-svc-v2", ("instances",), "Deployment", "spec.replicas", 3),
    ("api", ("exec_mode", "listen"), "Service", "spec.ports",
     lambda ports: [p["port"] for p in ports] == [8080, 8081]),
    ("worker", ("exec_mode",), "Service", "", None),  # fork mode: no Service
    ("api", ("listen",), "Deployment", C + "ports.1.containerPort", 8081),
    ("api", ("autorestart",), "Deployment", "spec.template.spec.restartPolicy", "Always"),
    ("api", ("kill_timeout",), "Deployment", "spec.template.spec.terminationGracePeriodSeconds", 7),
    ("edge-svc-v2", ("kill_timeout",), "Deployment", "spec.template.spec.terminationGracePeriodSeconds", 2),
    ("api", ("stop_signal",), "Deployment", C + "lifecycle.preStop.exec.command.2",
     lambda text: text.startswith("kill -INT 1;")),
    ("worker", ("stop_signal",), "Deployment", C + "lifecycle", None),  # SIGTERM: nothing to add
    ("api", ("ready_check",), "Deployment", C + "readinessProbe.httpGet",
     {"path": "/health?full=1", "port": 8080}),
    ("edge-svc-v2", ("ready_check",), "Deployment", C + "readinessProbe.tcpSocket", {"port": 9000}),
    ("api", ("ready_check",), "Deployment", C + "livenessProbe.tcpSocket", {"port": 8080}),
    ("api", ("listen_timeout",), "Deployment", C + "startupProbe.failureThreshold", 8),
    ("edge-svc-v2", ("listen_timeout",), "Deployment", C + "startupProbe", None),  # not set: none
    ("worker", ("listen_timeout",), "Deployment", "spec.minReadySeconds", 3),
    ("api", ("reload_mode",), "Deployment", "spec.strategy.rollingUpdate",
     {"maxUnavailable": 0, "maxSurge": 1}),
    ("edge-svc-v2", ("reload_mode",), "Deployment", "spec.strategy.rollingUpdate",
     {"maxUnavailable": 1, "maxSurge": 0}),
    ("api", ("max_memory_restart",), "Deployment", C + "resources.limits.memory", "512Mi"),
    ("edge-svc-v2", ("max_memory_restart",), "Deployment", C + "resources.limits.memory", 1000000),
    ("api", ("cron_restart",), "CronJob", "spec.schedule", "30 3 * * 1-5"),
    ("edge-svc-v2", ("cron_restart",), "CronJob", "spec.schedule", "0 4 * * *"),  # seconds 0 dropped
    ("api", ("cron_restart",), "CronJob", "spec.jobTemplate.spec.template.spec.containers.0.args",
     ["rollout", "restart", "deployment/api"]),
    ("api", ("cron_restart",), "Role", "rules.0.resourceNames", ["api"]),
]


@pytest.mark.parametrize("row", K8S_ROWS, ids=lambda r: f"{r[0]}-{'+'.join(r[1])}-{r[3]}")
def test_kubernetes_option_lands_where_it_should(row: tuple[str, tuple[str, ...], str, str, Expect]) -> None:
    label, _, kind, path, expected = row
    found = k8s_objects().get((kind, label))
    assert matches(dig(found, path) if found is not None else None, expected), dig(found, path)


S = "Service."
SYSTEMD_ROWS: list[tuple[str, tuple[str, ...], str, Expect]] = [
    ("api@.service", ("name",), "Unit.Description", ["pmx app api, instance %i"]),
    ("api@.service", ("script", "interpreter", "interpreter_args", "args"), S + "ExecStart",
     ['python3 -X dev server.py --bind fd://3 --name api-%i --motto "100%% $$(HOME) \\"quoted\\" it\'s"']),
    ("Edge_Svc.v2@.service", ("script", "interpreter", "args"), S + "ExecStart",
     ["/usr/bin/env python3 -m http.server 9000"]),
    ("api@.service", ("cwd",), S + "WorkingDirectory", [str(RICH.parent / "srv")]),
    ("api@.service", ("env",), S + "Environment",
     lambda values: '"LOG_LEVEL=info"' in values and '"GREETING=50%% off $today"' in values
     and '"PMX_INSTANCE=%i"' in values and not any("TOKEN" in v for v in values)),
    ("api@.service", ("env",), S + "EnvironmentFile", ["/etc/pmx/api.env"]),
    ("api.env", ("env",), "", 'API_TOKEN="t0k3n"\nDB_PASSWORD="p\'w\\"\\$x"\n'),
    ("Edge_Svc.v2@.service", ("instances",), "#",
     lambda lines: any("enable --now" in line and "Edge_Svc.v2@2.service" in line for line in lines)),
    ("api@.service", ("instances",), "#",
     lambda lines: any("$(seq -f 'api@%g.service' 0 $(($(nproc) - 1)))" in line for line in lines)),
    ("api.socket", ("exec_mode", "listen"), "Socket.ListenStream", ["0.0.0.0:8080", "[::1]:8081"]),
    ("api@.service", ("exec_mode", "listen"), S + "Sockets", ["api.socket"]),
    ("sock.socket", ("listen",), "Socket.ListenStream", ["/run/sock-app.sock"]),
    ("Edge_Svc.v2@.socket", ("reuse_port",), "Socket.ReusePort", ["yes"]),
    ("Edge_Svc.v2@.service", ("reuse_port",), S + "Sockets", ["Edge_Svc.v2@%i.socket"]),
    ("api@.service", ("user",), S + "User", ["www"]),
    ("api@.service", ("group",), S + "Group", ["www-data"]),
    ("api@.service", ("autorestart",), S + "Restart", ["always"]),
    ("worker@.service", ("autorestart",), S + "Restart", ["no"]),
    ("api@.service", ("restart_delay",), S + "RestartSec", ["500ms"]),
    ("api@.service", ("kill_timeout",), S + "TimeoutStopSec", ["7s"]),
    ("api@.service", ("stop_signal",), S + "KillSignal", ["SIGINT"]),
    ("api@.service", ("wait_ready",), S + "Type", ["notify"]),
    ("worker@.service", ("wait_ready",), S + "Type", ["exec"]),
    ("api@.service", ("listen_timeout",), S + "TimeoutStartSec", ["8s"]),
    ("Edge_Svc.v2@.service", ("reload_mode",), "#",
     lambda lines: any("for i in 0 1 2; do sudo systemctl restart" in line for line in lines)),
    ("api@.service", ("max_memory_restart",), S + "MemoryMax", ["512M"]),
    ("Edge_Svc.v2@.service", ("max_memory_restart",), S + "MemoryMax", ["1000000"]),
    ("api-restart.timer", ("cron_restart",), "Timer.OnCalendar", ["Mon..Fri *-*-* 03:30:00"]),
    ("Edge_Svc.v2-restart.service", ("cron_restart",), S + "ExecStart",
     [f"systemctl try-restart Edge_Svc.v2@{i}.service" for i in range(3)]),
]


@pytest.mark.parametrize("row", SYSTEMD_ROWS, ids=lambda r: f"{r[0]}-{'+'.join(r[1])}-{r[2]}")
def test_systemd_option_lands_where_it_should(row: tuple[str, tuple[str, ...], str, Expect]) -> None:
    name, _, key, expected = row
    files = {f.name: f.text for f in systemd(RICH)[0]}
    found: object = files[name] if key == "" else unit_settings(files[name]).get(key)
    assert matches(found, expected), found


COMPOSE_ROWS: list[tuple[str, tuple[str, ...], str, Expect]] = [
    ("api", ("name",), "environment.PMX_APP_NAME", "api"),
    ("edge_svc.v2", ("name",), "environment.PMX_APP_NAME", "Edge_Svc.v2"),
    ("api", ("script", "interpreter", "interpreter_args"), "entrypoint",
     ["python3", "-X", "dev", "server.py"]),
    ("api", ("args",), "command",
     ["--bind", "0.0.0.0:8080", "--name", "api-0", "--motto", "100% $$(HOME) \"quoted\" it's"]),
    ("api", ("cwd",), "working_dir", "/app/srv"),
    ("api", ("env",), "environment",
     {"GREETING": "50% off $$today", "LOG_LEVEL": "info", "PMX_APP_NAME": "api", "PORT": "8080"}),
    ("api", ("env",), "env_file", ["api.env"]),
    ("api", ("instances",), "deploy.replicas", 2),
    ("edge_svc.v2", ("instances",), "deploy.replicas", 3),
    ("api", ("exec_mode", "listen"), "expose", ["8080", "8081"]),
    ("worker", ("exec_mode",), "expose", None),
    ("api", ("user", "group"), "user", "www:www-data"),
    ("api", ("autorestart",), "restart", "always"),
    ("worker", ("autorestart",), "restart", "no"),
    ("api", ("kill_timeout",), "stop_grace_period", "7s"),
    ("edge_svc.v2", ("kill_timeout",), "stop_grace_period", "1600ms"),
    ("api", ("stop_signal",), "stop_signal", "SIGINT"),
    ("api", ("ready_check",), "healthcheck.test",
     ["CMD", "curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/health?full=1"]),
    ("edge_svc.v2", ("ready_check",), "healthcheck.test", ["CMD", "nc", "-z", "127.0.0.1", "9000"]),
    ("api", ("listen_timeout",), "healthcheck.start_period", "8s"),
    ("api", ("max_memory_restart",), "mem_limit", "512m"),
]


@pytest.mark.parametrize("row", COMPOSE_ROWS, ids=lambda r: f"{r[0]}-{'+'.join(r[1])}-{r[2]}")
def test_compose_option_lands_where_it_should(row: tuple[str, tuple[str, ...], str, Expect]) -> None:
    service, _, path, expected = row
    services = yaml.safe_load(compose(RICH)[0][0].text)["services"]
    assert matches(dig(services[service], path), expected), dig(services[service], path)


ROWS = {"kubernetes": {o for row in K8S_ROWS for o in row[1]},
        "systemd": {o for row in SYSTEMD_ROWS for o in row[1]},
        "compose": {o for row in COMPOSE_ROWS for o in row[1]}}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_mapped_option_has_a_row_in_the_table(target: str) -> None:
    untested = set(MODULES[target].MAPPED) - ROWS[target]
    assert untested == set(), f"add rows for {sorted(untested)} to the {target} table"


def test_the_rich_ecosystem_sets_every_option() -> None:
    names = {option.name for option in OPTIONS} - {"port"}  # port is listen's short form
    set_somewhere = {name for app in load_apps(str(RICH)) for name in app.set_options}
    assert names - set_somewhere == set(), \
        f"set {sorted(names - set_somewhere)} in {RICH.relative_to(ROOT)} and map or report it"


@pytest.mark.parametrize("target", sorted(TARGETS))
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_option_set_is_mapped_or_reported(target: str, path: Path) -> None:
    """Nothing is dropped silently: each option an app sets is in the target's MAPPED,
    or it is in that app's report (in the output's comments and on stderr)."""
    files, reports = TARGETS[target](path)
    text = "".join(f.text for f in files)
    for app, report in zip(load_apps(str(path)), reports, strict=True):
        reported = {option for option, _ in report.unmapped}
        missing = [o for o in app.set_options if o not in MODULES[target].MAPPED and o not in reported]
        assert missing == [], f"{app.name}: {missing} neither mapped nor reported"
        for line in report.lines():
            assert " ".join(line.splitlines()) in text  # each note is in the output too


def test_an_option_pmx_learns_later_is_reported_not_dropped() -> None:
    app = load_apps(str(RICH), only=["worker"])[0]
    later = dataclasses.replace(app, set_options=(*app.set_options, "colour_logs"))
    for target in TARGETS:
        found = dict(unmapped(later, MODULES[target].MAPPED, MODULES[target].REASONS, target))
        assert found["colour_logs"] == f"{target} has no equivalent"


def test_unmapped_options_of_the_rich_ecosystem_are_the_expected_ones() -> None:
    reported = {target: {o for r in TARGETS[target](RICH)[1] if r.app == "api" for o, _ in r.unmapped}
                for target in TARGETS}
    assert {"user", "group", "exp_backoff_restart_delay", "merge_logs", "wait_ready",
            "shutdown_with_message", "watch", "env_production"} <= reported["kubernetes"]
    assert {"exp_backoff_restart_delay", "merge_logs", "ready_check", "max_restarts",
            "env_production"} <= reported["systemd"]
    assert {"user", "group", "wait_ready"} & reported["systemd"] == set()
    assert {"cron_restart", "exp_backoff_restart_delay", "merge_logs", "wait_ready"} <= reported["compose"]


# ---------------------------------------------------------------- secrets, determinism, names


def test_secret_values_stay_out_of_manifests_and_units() -> None:
    for target in TARGETS:
        for file in TARGETS[target](RICH)[0]:
            holds = [secret for secret in SECRETS if secret in file.text]
            if file.mode == 0o600:
                assert file.name.endswith(".env") and holds and (
                    file.masked is None or not any(s in file.masked for s in SECRETS))
            else:
                assert holds == [], f"{target} {file.name} holds a secret value"


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_output_is_deterministic(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same file, same text: whatever the CPU count ("max") or the env table's order."""
    monkeypatch.setattr(options_module, "cpu_count", lambda: 3)
    first = [(f.name, f.text) for f in TARGETS[target](RICH)[0]]
    monkeypatch.setattr(options_module, "cpu_count", lambda: 64)
    assert [(f.name, f.text) for f in TARGETS[target](RICH)[0]] == first


def test_env_order_in_the_file_does_not_change_the_output(tmp_path: Path) -> None:
    one = tmp_path / "one.toml"
    two = tmp_path / "two.toml"
    one.write_text('[[apps]]\nname = "a"\nscript = "a.py"\nenv = { B = "2", A = "1" }\n')
    two.write_text('[[apps]]\nname = "a"\nscript = "a.py"\nenv = { A = "1", B = "2" }\n')
    for target in TARGETS:
        texts = [[f.text.replace(p.name, "X") for f in TARGETS[target](p)[0]] for p in (one, two)]
        assert texts[0] == texts[1]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_the_secret_note_agrees_with_the_number_of_names(target: str, tmp_path: Path) -> None:
    path = tmp_path / "eco.toml"
    path.write_text('[[apps]]\nname = "one"\nscript = "a.py"\n'
                    'env = { DATABASE_PASSWORD = "x", LOG_LEVEL = "info" }\n'
                    '[[apps]]\nname = "two"\nscript = "b.py"\n'
                    'env = { API_TOKEN = "y", DATABASE_PASSWORD = "x" }\n')
    notes = {report.app: [n for n in report.notes if n.startswith("env: ")]
             for report in TARGETS[target](path)[1]}
    (one,), (two,) = notes["one"], notes["two"]
    assert one.startswith("env: DATABASE_PASSWORD looks secret"), one
    assert two.startswith("env: API_TOKEN, DATABASE_PASSWORD look secret"), two
    if target != "kubernetes":
        assert "it goes to one.env" in one and "they go to two.env" in two
    else:
        assert "comes from the Secret one-env" in one and "come from the Secret two-env" in two


def test_names_that_collide_after_conversion_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "eco.toml"
    path.write_text('[[apps]]\nname = "a_b"\nscript = "a.py"\n[[apps]]\nname = "a-b"\nscript = "b.py"\n')
    with pytest.raises(ConfigError, match='apps "a_b" and "a-b" would both be named "a-b"'):
        kubernetes(path)


# ---------------------------------------------------------------- systemd quoting, cron


@pytest.mark.parametrize(("arg", "expected"), [
    ("plain", "plain"),
    ("two words", '"two words"'),
    ('say "hi"\\', '"say \\"hi\\"\\\\"'),
    ("100%", '"100%%"'),
    ("$HOME", '"$$HOME"'),
    ("line\nbreak", '"line\\nbreak"'),
    ("", '""'),
    ("--name=api-{instance}", "--name=api-%i"),
    ("a b {instance}", '"a b %i"'),
])
def test_exec_start_arguments_are_quoted_for_systemd(arg: str, expected: str) -> None:
    assert exec_arg(arg) == expected


def test_environment_and_env_file_quoting() -> None:
    assert env_assignment("A", 'x "y" 5%') == '"A=x \\"y\\" 5%%"'
    assert env_assignment("I", "{instance}") == '"I={instance}"'  # pmx templates args, not env
    assert env_assignment("PMX_INSTANCE", "", instance=True) == '"PMX_INSTANCE=%i"'
    assert env_file_line("P", 'a"b$c`d\\e') == 'P="a\\"b\\$c\\`d\\\\e"\n'


@pytest.mark.parametrize(("cron", "calendar"), [
    ("*/15 * * * *", ["*-*-* *:00,15,30,45:00"]),
    ("30 3 * * 1-5", ["Mon..Fri *-*-* 03:30:00"]),
    ("0 0 1,15 * mon", ["*-*-01,15 00:00:00", "Mon *-*-* 00:00:00"]),  # cron: either day field
    ("@weekly", ["Sun *-*-* 00:00:00"]),
    ("0 4 * jan-mar sun,sat", ["Sun,Sat *-01..03-* 04:00:00"]),
    ("30 0 4 * * *", ["*-*-* 04:00:30"]),  # six fields: seconds first
    ("0 0 * * 7", ["Sun *-*-* 00:00:00"]),
    ("@reboot", None),
    ("0 0 L * *", None),
])
def test_cron_restart_becomes_on_calendar(cron: str, calendar: list[str] | None) -> None:
    assert to_on_calendar(cron) == calendar
    analyze = shutil.which("systemd-analyze")
    if calendar and analyze:
        result = subprocess.run([analyze, "calendar", *calendar], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, result.stderr


def test_cron_restart_as_a_cronjob_schedule() -> None:
    assert kubernetes_schedule("0 3 * * *") == "0 3 * * *"
    assert kubernetes_schedule("0 0 3 * * *") == "0 3 * * *"
    assert kubernetes_schedule("@daily") == "@daily"
    assert kubernetes_schedule("30 0 3 * * *") is None  # a CronJob has no seconds
    assert kubernetes_schedule("@reboot") is None


# ---------------------------------------------------------------- the command, as a user runs it


def run(*args: str, home: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PMX_HOME": str(home)}
    return subprocess.run([*CLI, "export", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=60)


def test_cli_prints_to_stdout_and_notes_to_stderr_without_a_daemon(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = run("kubernetes", "config-examples/ecosystem.toml", "--image", "shop:1", home=home)
    assert result.returncode == 0, result.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout)]
    assert kinds == ["Deployment", "Service", "Deployment"]
    assert 'app "worker": not mapped: env_production' in result.stderr
    assert not home.exists()  # no pmxd was started, no home made


def test_cli_writes_files_with_o_and_secrets_0600(tmp_path: Path) -> None:
    out = tmp_path / "units"
    result = run("systemd", str(RICH), "-o", str(out), home=tmp_path / "home")
    assert result.returncode == 0, result.stderr
    assert (out / "api@.service").is_file() and (out / "api.socket").is_file()
    assert stat.S_IMODE((out / "api.env").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "api@.service").stat().st_mode) == 0o644
    printed = run("systemd", str(RICH), home=tmp_path / "home").stdout
    assert "# ==> api.env <==" in printed and "API_TOKEN=" in printed and "t0k3n" not in printed


def test_cli_compose_env_file_is_written_only_with_o(tmp_path: Path) -> None:
    result = run("compose", str(RICH), home=tmp_path / "home")
    assert result.returncode == 0
    assert "api.env holds secret values: written only with -o DIR" in result.stderr
    assert yaml.safe_load(result.stdout)["services"]["api"]["env_file"] == ["api.env"]
    assert run("compose", str(RICH), "-o", str(tmp_path / "c"), home=tmp_path / "home").returncode == 0
    assert stat.S_IMODE((tmp_path / "c" / "api.env").stat().st_mode) == 0o600


def test_cli_bad_file_is_one_line_naming_file_app_and_key(tmp_path: Path) -> None:
    path = tmp_path / "eco.toml"
    path.write_text('[[apps]]\nname = "api"\nscript = "a.py"\ninstnaces = 2\n')
    result = run("compose", str(path), home=tmp_path / "home")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f'pmx: {path}: app "api" (apps[0]): unknown key "instnaces"; '
                             'did you mean "instances"?\n')
    missing = run("kubernetes", "nope.toml", home=tmp_path / "home")
    assert (missing.returncode, missing.stderr) == (2, "pmx: nope.toml: no such file\n")


PM2_YAML = ROOT / "tests" / "configs" / "pm2" / "process.yml"


def test_a_pm2_file_exports_too_with_what_its_conversion_changed() -> None:
    if not PM2_YAML.exists():
        pytest.skip(f"{PM2_YAML.relative_to(ROOT)} is not in this checkout")
    import kubernetes_validate  # type: ignore[import-untyped]

    files, reports = kubernetes(PM2_YAML)
    for document in (d for f in files for d in yaml.safe_load_all(f.text)):
        kubernetes_validate.validate(document, "1.30.0", strict=True)
    api = next(r for r in reports if r.app == "api")
    assert ("env_production", "not selected; export with --env production to use it") in api.unmapped
    assert any("when converting the PM2 file" in note for note in api.notes)
