"""`pmx export compose`: one compose file, a service per app.

`instances` becomes `deploy.replicas` (`"max"`: `--max-instances`), the stop signal and
`kill_timeout` become `stop_signal` and `stop_grace_period`, `max_memory_restart`
becomes `mem_limit`, the readiness check (ready_check, else a TCP connect to a cluster
app's port) a `healthcheck` run inside the container with curl (HTTP) or nc (TCP). A
port is published on the host only with one replica (several replicas cannot share one
host port without a proxy); it is always exposed to the other services. Secret-looking
env names go to an env file NAME.env (mode 0600) beside the compose file. Compose
interpolates `$` in every value, so each one the file carries is written with `$$`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .export_common import (
    GENERATED_BY,
    ExportApp,
    OutFile,
    Report,
    comment,
    container_args,
    dump_yaml,
    new_report,
    parse_check,
    program,
    rebase,
    seconds_text,
    secret_note,
    size_text,
    split_env,
    tcp_ports,
    template,
    unique_names,
    unix_paths,
)

TARGET = "compose"
COMPOSE_FILE = "compose.yaml"
MAPPED = frozenset({
    "name", "script", "args", "interpreter", "interpreter_args", "cwd", "env", "instances",
    "exec_mode", "listen", "user", "group", "autorestart", "kill_timeout", "stop_signal", "ready_check",
    "listen_timeout", "max_memory_restart",
})
_LOGS = "logs go to the container's stdout and stderr (docker compose logs)"
_RESTARTS = "Docker restarts a container with its own back-off"
REASONS = {
    "reuse_port": "not needed: every container binds its own socket",
    "preload": "not needed: every container binds its port itself; pmx's preloads run only under pmxd",
    "max_restarts": _RESTARTS, "min_uptime": _RESTARTS, "restart_delay": _RESTARTS,
    "exp_backoff_restart_delay": _RESTARTS,
    "shutdown_with_message": "a Node IPC message of pmx's; the container gets the stop signal",
    "wait_ready": "compose has no notify protocol (READY=1, process.send): use ready_check",
    "reload_mode": "docker compose replaces containers itself; there is no one-by-one reload",
    "cron_restart": "compose has no scheduler: run docker compose restart from cron or a timer",
    "memory_limit_samples": "the kernel kills at mem_limit at once",
    "out_file": _LOGS, "error_file": _LOGS, "merge_logs": _LOGS, "log_date_format": _LOGS,
    "max_log_size": "set the logging driver's max-size", "retain": "set the logging driver's max-file",
    "watch": "docker compose watch (develop.watch) syncs or rebuilds; pmx's reload has no equivalent",
    "ignore_watch": "see watch", "watch_delay": "see watch",
}


@dataclass(frozen=True, slots=True)
class Options:
    image: str  # may hold {name}
    workdir: str
    max_instances: int


def export(apps: list[ExportApp], options: Options, source: str) -> tuple[list[OutFile], list[Report]]:
    """compose.yaml with every app, and NAME.env (0600) for each app with secrets."""
    names = unique_names(apps, _service_name)
    services: dict[str, object] = {}
    reports: list[Report] = []
    env_files: list[OutFile] = []
    for app in apps:
        report = new_report(app, MAPPED, REASONS, "compose")
        services[names[app.name]] = _service(app, names[app.name], options, report, env_files)
        reports.append(report)
    header = [GENERATED_BY.format(target=TARGET, source=source)]
    header += [line for report in reports for line in report.lines()]
    text = comment(header) + dump_yaml([{"services": services}])
    return [OutFile(COMPOSE_FILE, text), *env_files], reports


def _service_name(name: str) -> str:
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in name.lower())
    return cleaned.strip("-._") or "app"


def _dollars(text: str) -> str:
    return text.replace("$", "$$")


def _service(app: ExportApp, name: str, options: Options, report: Report,
             env_files: list[OutFile]) -> dict[str, object]:
    spec = app.spec
    ports = tcp_ports(spec)
    port = ports[0] if ports else None
    values = {"port": str(port) if port is not None else "{port}", "instance": "0"}
    if any("{instance}" in arg for arg in spec.args):
        report.notes.append("args: {instance} became 0: compose gives replicas no index")
    service: dict[str, object] = {"image": options.image.replace("{name}", app.name)}
    service["entrypoint"] = [_dollars(rebase(part, app, options.workdir)) for part in program(spec)]
    args = [_dollars(template(arg, values)) for arg in container_args(app, port, report)]
    if args:
        service["command"] = args
    service["working_dir"] = _dollars(rebase(spec.cwd, app, options.workdir))
    if spec.user is not None:
        service["user"] = spec.user + (f":{spec.group}" if spec.group else "")
    elif spec.group is not None:
        report.unmapped.append(("group", "compose's user takes a group only with a user "
                                         "(user: USER:GROUP)"))
    plain, secret = split_env(spec.env)
    environment = {key: _dollars(value) for key, value in plain.items()}
    environment["PMX_APP_NAME"] = app.name
    if port is not None and spec.is_cluster:
        environment["PORT"] = str(port)
    service["environment"] = {key: environment[key] for key in sorted(environment)}
    if secret:
        env_file = f"{name}.env"
        service["env_file"] = [env_file]
        env_files.append(OutFile(env_file, "".join(_env_line(k, v) for k, v in secret.items()), 0o600))
        report.notes.append(secret_note(secret, "looks secret: it goes", "look secret: they go")
                            + f" to {env_file} (mode 0600, written with -o DIR), not into the "
                            "compose file")
    replicas = options.max_instances if app.is_max else spec.instances
    if app.is_max:
        report.notes.append(f'instances = "max" became replicas: {replicas} (--max-instances)')
    if spec.is_cluster and ports:
        service["expose"] = [str(p) for p in ports]
        if replicas == 1:
            service["ports"] = [_published(address) for address in spec.listen
                                if not address.startswith("unix:")]
        else:
            report.notes.append(f"listen: {replicas} replicas cannot share a host port; port "
                                f"{port} is exposed to the other services, put a proxy in front")
    if spec.is_cluster and not spec.listen:
        report.notes.append("cluster mode without listen: the port is learned at run time; "
                            "add expose (and ports) for it")
    if unix_paths(spec):
        report.unmapped.append(("listen", "unix sockets stay inside the container"))
    service["deploy"] = {"replicas": replicas}
    healthcheck = _healthcheck(app, report)
    if healthcheck is not None:
        service["healthcheck"] = healthcheck
    elif app.sets("listen_timeout"):
        report.unmapped.append(("listen_timeout", "without a healthcheck there is no start_period"))
    if spec.max_memory_restart_bytes is not None:
        service["mem_limit"] = size_text(spec.max_memory_restart_bytes, {"K": "k", "M": "m", "G": "g"})
    service["stop_signal"] = spec.stop_signal
    service["stop_grace_period"] = seconds_text(spec.kill_timeout_s)
    service["restart"] = "always" if spec.autorestart else "no"
    return service


def _published(address: str) -> str:
    host, _, port = address.rpartition(":")
    return f"{port}:{port}" if host in ("0.0.0.0", "[::]") else f"{host}:{port}:{port}"


def _healthcheck(app: ExportApp, report: Report) -> dict[str, object] | None:
    spec = app.spec
    check = parse_check(spec, "0", report)
    if check is None and spec.ready_check is None and spec.is_cluster and tcp_ports(spec):
        test = ["CMD", "nc", "-z", "127.0.0.1", str(tcp_ports(spec)[0])]
    elif check is None:
        return None
    elif check.kind == "http":
        test = ["CMD", "curl", "-fsS", "-o", "/dev/null",
                _dollars(f"http://127.0.0.1:{check.port}{check.path}")]
    else:
        test = ["CMD", "nc", "-z", "127.0.0.1", str(check.port)]
    return {"test": test, "interval": "5s", "timeout": "1s", "retries": 3,
            "start_period": seconds_text(spec.listen_timeout_s)}


def _env_line(name: str, value: str) -> str:
    """NAME='value' (single quotes: no interpolation); a value holding ' or a line
    break in double quotes with \\, ", $ and the line break escaped."""
    if "'" not in value and "\n" not in value:
        return f"{name}='{value}'\n"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("\n", "\\n")
    return f'{name}="{escaped}"\n'
