"""`pmx export kubernetes`: a Deployment per app, a Service per cluster app with a TCP
port, and a CronJob (with its ServiceAccount, Role and RoleBinding) per `cron_restart`.

Each pod is one instance: `instances` becomes `replicas` (`"max"`, this host's CPU
count, becomes `--max-instances`, 2 by default, so that the output does not depend on the
machine that exported it). A pod has no socket from pmx, so a cluster app binds its port
itself (PORT is set) and the Service spreads connections over the pods; pmx's one-by-one
reload is a RollingUpdate with maxUnavailable 0 and maxSurge 1 (`reload_mode = "restart"`:
maxSurge 0, maxUnavailable 1). Secret-looking env names become secretKeyRef entries of a
Secret "<app>-env", never inline values. What Kubernetes cannot express is in `REASONS`.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass

from .export_common import (
    GENERATED_BY,
    Check,
    ExportApp,
    OutFile,
    Report,
    comment,
    container_args,
    dns_label,
    dump_yaml,
    new_report,
    parse_check,
    program,
    rebase,
    secret_note,
    split_env,
    tcp_ports,
    template,
    unique_names,
    unix_paths,
)
from .export_cron import kubernetes_schedule

TARGET = "kubernetes"
NAME_LABEL = "app.kubernetes.io/name"
# The options this target maps (where each lands is in the README's table).
MAPPED = frozenset({
    "name", "script", "args", "interpreter", "interpreter_args", "cwd", "env", "instances",
    "exec_mode", "listen", "autorestart", "kill_timeout", "stop_signal", "ready_check",
    "listen_timeout", "reload_mode", "max_memory_restart", "cron_restart",
})
_LOGS = "logs go to the container's stdout and stderr; the kubelet keeps and rotates them"
_BACKOFF = "the kubelet restarts a crashed container with its own back-off (10s doubling to 5m)"
REASONS = {
    "reuse_port": "not needed: every pod binds its own socket",
    "preload": "not needed: every pod binds its port itself; pmx's preloads run only under pmxd",
    "user": "Kubernetes takes a numeric uid: set securityContext.runAsUser",
    "group": "Kubernetes takes a numeric gid: set securityContext.runAsGroup",
    "max_restarts": _BACKOFF + ", with no limit",
    "min_uptime": _BACKOFF,
    "restart_delay": _BACKOFF,
    "exp_backoff_restart_delay": _BACKOFF,
    "shutdown_with_message": "a Node IPC message of pmx's; the pod gets the stop signal",
    "wait_ready": "Kubernetes has no notify protocol (READY=1, process.send): use ready_check",
    "memory_limit_samples": "the kernel kills at the memory limit at once",
    "out_file": _LOGS, "error_file": _LOGS, "merge_logs": _LOGS, "log_date_format": _LOGS,
    "max_log_size": _LOGS, "retain": _LOGS,
    "watch": "a cluster runs images: build a new one and roll it out (kubectl rollout)",
    "ignore_watch": "see watch", "watch_delay": "see watch",
}


@dataclass(frozen=True, slots=True)
class Options:
    image: str  # may hold {name}: the app's name
    namespace: str | None
    workdir: str  # where the ecosystem file's folder is in the image
    max_instances: int
    kubectl_image: str


def export(apps: list[ExportApp], options: Options, source: str) -> tuple[list[OutFile], list[Report]]:
    """One YAML file per app (its Deployment, Service, CronJob), and what did not map."""
    labels = unique_names(apps, dns_label)
    unique_names(apps, lambda name: dns_label(name, letter_first=True))  # Service names
    files, reports = [], []
    for app in apps:
        report = new_report(app, MAPPED, REASONS, "Kubernetes")
        documents = _documents(app, labels[app.name], options, report)
        header = [GENERATED_BY.format(target=TARGET, source=source), *report.lines()]
        files.append(OutFile(f"{labels[app.name]}.yaml", comment(header) + dump_yaml(documents)))
        reports.append(report)
    return files, reports


def _documents(app: ExportApp, label: str, options: Options, report: Report) -> list[object]:
    spec = app.spec
    if not spec.autorestart:
        report.unmapped.append(("autorestart", "a Deployment always restarts its pods; a program "
                                               "that runs once is a Job"))
    documents: list[object] = [_deployment(app, label, options, report)]
    ports = tcp_ports(spec)
    if spec.is_cluster and ports:
        documents.append(_service(label, ports, options))
    if spec.is_cluster and not spec.listen:
        report.notes.append("cluster mode without listen: the port is learned at run time, so "
                            "there is no Service; add containerPort and a Service for it")
    if unix_paths(spec):
        report.unmapped.append(("listen", f"unix sockets ({', '.join(unix_paths(spec))}) are not "
                                          "reachable from other pods; a Service needs a TCP port"))
    if spec.cron_restart:
        documents += _cron_restart(app, label, spec.cron_restart, options, report)
    return documents


def _metadata(name: str, options: Options, label: str) -> dict[str, object]:
    metadata: dict[str, object] = {"name": name}
    if options.namespace:
        metadata["namespace"] = options.namespace
    metadata["labels"] = {NAME_LABEL: label}
    return metadata


def _deployment(app: ExportApp, label: str, options: Options, report: Report) -> dict[str, object]:
    spec = app.spec
    replicas = spec.instances
    if app.is_max:
        replicas = options.max_instances
        report.notes.append(f'instances = "max" (the CPUs of a host) became replicas: {replicas} '
                            "(--max-instances); scale with more replicas or a HorizontalPodAutoscaler")
    strategy = {"maxUnavailable": 0, "maxSurge": 1} if spec.reload_mode == "overlap" else \
        {"maxUnavailable": 1, "maxSurge": 0}
    check = _probe_check(app, report)
    pod: dict[str, object] = {
        "restartPolicy": "Always",  # the only policy a Deployment takes: autorestart
        "terminationGracePeriodSeconds": max(1, math.ceil(spec.kill_timeout_s)),
        "containers": [_container(app, label, options, check, report)],
    }
    deployment_spec: dict[str, object] = {
        "replicas": replicas,
        "selector": {"matchLabels": {NAME_LABEL: label}},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": strategy},
    }
    if check is None:
        # pmx counts a replacement without checks ready once it stayed up listen_timeout.
        deployment_spec["minReadySeconds"] = math.ceil(spec.listen_timeout_s)
    deployment_spec["template"] = {"metadata": {"labels": {NAME_LABEL: label}}, "spec": pod}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _metadata(label, options, label), "spec": deployment_spec}


def _probe_check(app: ExportApp, report: Report) -> Check | None:
    """The readiness check: ready_check, else a TCP connect to a cluster app's port (pmx
    counts an instance that accepts on its socket as ready)."""
    spec = app.spec
    check = parse_check(spec, "0", report)
    if spec.ready_check and "{instance}" in spec.ready_check:
        report.notes.append("ready_check: {instance} became 0: every pod is probed alike")
    if check is None and spec.ready_check is None and spec.is_cluster and tcp_ports(spec):
        check = Check("tcp", "", tcp_ports(spec)[0], "")
    return check


def _container(app: ExportApp, label: str, options: Options, check: Check | None,
               report: Report) -> dict[str, object]:
    spec = app.spec
    ports = tcp_ports(spec)
    port = ports[0] if ports else None
    uses_pod_name = any("{instance}" in arg for arg in spec.args)
    values = {"port": str(port) if port is not None else "{port}", "instance": "$(PMX_POD_NAME)"}
    argv = [rebase(part, app, options.workdir) for part in program(spec)]
    args = [template(_escape(arg), values) for arg in container_args(app, port, report)]
    container: dict[str, object] = {
        "name": label,
        "image": options.image.replace("{name}", app.name),
        "command": argv,
    }
    if args:
        container["args"] = args
    if uses_pod_name:
        report.notes.append("args: {instance} became the pod's name ($(PMX_POD_NAME)); pods "
                            "have no index 0..N-1")
    container["workingDir"] = rebase(spec.cwd, app, options.workdir)
    container["env"] = _env(app, label, port, uses_pod_name, report)
    if port is not None and spec.is_cluster:
        container["ports"] = [{"name": f"tcp-{p}", "containerPort": p, "protocol": "TCP"} for p in ports]
        report.notes.append(f"listen {', '.join(spec.listen)}: in a pod the app binds "
                            f"0.0.0.0:{port} itself (PORT is set); the Service exposes it")
    if check is not None:
        probe = _probe(check)
        if app.sets("listen_timeout"):
            # Only when the file sets it: a pod that misses a startup probe is killed, a
            # harder rule than pmx's default 3s, which only fails a reload.
            container["startupProbe"] = {**probe, "periodSeconds": 1,
                                         "failureThreshold": max(1, math.ceil(spec.listen_timeout_s))}
        container["readinessProbe"] = {**probe, "periodSeconds": 5}
        # Liveness: pmx restarts an instance only when it exits; "it no longer accepts
        # connections" is the nearest, and stricter checks would restart busy pods.
        container["livenessProbe"] = {"tcpSocket": {"port": check.port}, "periodSeconds": 10,
                                      "failureThreshold": 3}
    if spec.max_memory_restart_bytes is not None:
        memory = _quantity(spec.max_memory_restart_bytes)
        container["resources"] = {"limits": {"memory": memory}}
        report.notes.append(f"max_memory_restart: limits.memory {memory}; the kernel kills the "
                            "container at the limit (pmx restarted it gracefully)")
    if spec.stop_signal != "SIGTERM":
        signal_name = spec.stop_signal.removeprefix("SIG")
        # The kubelet sends SIGTERM after preStop; the hook sends the app's own signal
        # first and holds SIGTERM back until the app has exited (or the grace period ends).
        container["lifecycle"] = {"preStop": {"exec": {"command": [
            "/bin/sh", "-c", f"kill -{signal_name} 1; while kill -0 1 2>/dev/null; do sleep 1; done"]}}}
        report.notes.append(f"stop_signal {spec.stop_signal}: a preStop hook sends it to PID 1 (needs "
                            f"/bin/sh in the image); or set STOPSIGNAL {spec.stop_signal} in the Dockerfile")
    return container


def _escape(arg: str) -> str:
    """Kubernetes expands $(VAR) in command, args and env values; $$ keeps a literal $."""
    return arg.replace("$(", "$$(")


def _env(app: ExportApp, label: str, port: int | None, uses_pod_name: bool,
         report: Report) -> list[dict[str, object]]:
    plain, secret = split_env(app.spec.env)
    env: dict[str, dict[str, object]] = {}
    for name, value in plain.items():
        env[name] = {"name": name, "value": _escape(value)}
    for name in secret:
        env[name] = {"name": name, "valueFrom": {"secretKeyRef": {"name": f"{label}-env", "key": name}}}
    env["PMX_APP_NAME"] = {"name": "PMX_APP_NAME", "value": app.name}
    if port is not None and app.spec.is_cluster:
        env["PORT"] = {"name": "PORT", "value": str(port)}  # pmx's PORT wins over env, as in spawn
    if uses_pod_name:
        env["PMX_POD_NAME"] = {"name": "PMX_POD_NAME",
                               "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    if secret:
        literals = " ".join(f"--from-literal={shlex.quote(name)}=..." for name in secret)
        report.notes.append(secret_note(secret, "looks secret and comes", "look secret and come")
                            + f" from the Secret {label}-env: kubectl create secret generic "
                            f"{label}-env {literals}")
    return [env[name] for name in sorted(env)]


def _probe(check: Check) -> dict[str, object]:
    if check.kind == "http":
        return {"httpGet": {"path": check.path, "port": check.port}}
    return {"tcpSocket": {"port": check.port}}


def _quantity(size: int) -> str | int:
    for unit, factor in (("Gi", 1024**3), ("Mi", 1024**2), ("Ki", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return size


def _service(label: str, ports: list[int], options: Options) -> dict[str, object]:
    name = dns_label(label, letter_first=True)
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _metadata(name, options, label),
        "spec": {"selector": {NAME_LABEL: label},
                 "ports": [{"name": f"tcp-{p}", "port": p, "targetPort": p, "protocol": "TCP"}
                           for p in ports]},
    }


def _cron_restart(app: ExportApp, label: str, cron: str, options: Options,
                  report: Report) -> list[object]:
    """`cron_restart` (a reload, no downtime) as a CronJob running `kubectl rollout
    restart`, a rolling restart, with the RBAC it needs."""
    schedule = kubernetes_schedule(cron)
    if schedule is None:
        report.unmapped.append(("cron_restart", f"{cron!r}: a CronJob schedule has five fields "
                                                "(seconds only as 0)"))
        return []
    name = f"{label}-restart"[:52].rstrip("-")  # a CronJob name is at most 52 characters
    metadata = _metadata(name, options, label)
    namespace = options.namespace or "default"
    if not options.namespace:
        report.notes.append("cron_restart: the RoleBinding names namespace \"default\"; "
                            "export with --namespace for another")
    report.notes.append(f"cron_restart {cron!r}: a CronJob runs kubectl rollout restart "
                        f"deployment/{label} (one pod at a time), in the controller's time zone "
                        "(pmx: local time; set spec.timeZone)")
    role_rule = {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": [label],
                 "verbs": ["get", "patch"]}
    job_pod = {"serviceAccountName": name, "restartPolicy": "Never", "containers": [{
        "name": "rollout-restart", "image": options.kubectl_image,
        "args": ["rollout", "restart", f"deployment/{label}"]}]}  # the image's entrypoint is kubectl
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": metadata,
         "rules": [role_rule]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": metadata,
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}]},
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": metadata,
         "spec": {"schedule": schedule, "concurrencyPolicy": "Forbid",
                  "jobTemplate": {"spec": {"backoffLimit": 2, "template": {"spec": job_pod}}}}},
    ]
