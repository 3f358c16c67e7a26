"""/metrics: pmxd's figures in the Prometheus text format, through prometheus-client.

Each scrape asks pmxd afresh (`ping`, `list`, `describe all`: three small requests, in
a worker thread) and reads CPU time with psutil, then `PmxCollector` turns one such
`Figures` into metric families in a CollectorRegistry of its own (never the global
one), and prometheus-client writes the exposition.

    pmx_daemon_up                        1 when pmxd answered, else 0 (and nothing else)
    pmx_daemon_memory_bytes              pmxd's resident memory
    pmx_daemon_cpu_seconds_total         pmxd's CPU time (user + system)
    pmx_daemon_uptime_seconds
    pmx_app_instances_desired{app}       the instance count the app is set to
    pmx_app_instances_online{app}
    pmx_app_reloaded_instances_total{app}  instances replaced by a reload  } seen by this
    pmx_app_reload_failures_total{app}                                     } pmx web on the
    pmx_app_memory_restarts_total{app}   restarts for max_memory_restart   } event stream
    pmx_instance_memory_bytes{app,instance}        RSS of the instance's process tree
    pmx_instance_cpu_seconds_total{app,instance}   CPU time of the tree (psutil)
    pmx_instance_restarts_total{app,instance}
    pmx_instance_uptime_seconds{app,instance}
    pmx_instance_state{app,instance,state}         1 for the current state, 0 for the others

Memory, restarts, uptime and state are pmxd's own figures, as `pmx list --json` shows
them. A reload's replacement that is not ready yet is left out (it shares its slot's
labels with the instance it replaces).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from pmx.cli.client import Client
from pmx.cli.monit_board import json_float, json_int, json_objects, json_str
from pmx.supervisor.errors import PmxError
from pmx.supervisor.protocol import Command, JsonObject
from pmx.supervisor.states import State
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(slots=True)
class Figures:
    """One scrape's worth of pmxd's figures."""

    daemon: JsonObject | None = None  # the ping reply; None: pmxd did not answer
    daemon_cpu_s: float | None = None
    daemon_memory: int | None = None
    rows: list[JsonObject] = field(default_factory=list)  # `list`
    apps: list[JsonObject] = field(default_factory=list)  # `describe all`
    cpu_seconds: dict[int, float] = field(default_factory=dict)  # pid -> tree CPU time
    counters: dict[str, dict[str, int]] = field(default_factory=dict)  # from the hub


def read_figures(client: Client, counters: dict[str, dict[str, int]]) -> Figures:
    """Ask pmxd and psutil (blocking: call it off the event loop). `counters` is a copy
    of the hub's, taken on the loop."""
    figures = Figures(counters=counters)
    try:
        figures.daemon = client.call(Command.PING, timeout_s=2.0)
        figures.rows = json_objects(client.call(Command.LIST).get("instances"))
        figures.apps = json_objects(client.call(Command.DESCRIBE, {"target": "all"}).get("apps"))
    except PmxError:
        return Figures()
    _read_cpu(figures)
    return figures


def _read_cpu(figures: Figures) -> None:
    """pmxd's own CPU and memory, and each instance's CPU time summed over its process
    tree as pmxd sums memory (with its reaped children, so a worker that comes and goes
    does not make the counter fall)."""
    import psutil

    daemon_pid = json_int(figures.daemon.get("pid") if figures.daemon else None, -1)
    try:
        proc = psutil.Process(daemon_pid)
        with proc.oneshot():
            times = proc.cpu_times()
            figures.daemon_memory = proc.memory_info().rss
        figures.daemon_cpu_s = times.user + times.system
    except (psutil.Error, ValueError):
        pass
    roots = {pid for row in figures.rows if isinstance(pid := row.get("pid"), int)}
    if not roots:
        return
    children: dict[int, list[int]] = {}
    for child in psutil.process_iter(["ppid"]):
        if ppid := child.info.get("ppid"):
            children.setdefault(int(ppid), []).append(child.pid)
    for root in roots:
        total, stack = 0.0, [root]
        while stack:
            pid = stack.pop()
            stack.extend(children.get(pid, ()))
            try:
                t = psutil.Process(pid).cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system + t.children_user + t.children_system
        figures.cpu_seconds[root] = round(total, 3)


class PmxCollector(Collector):
    """The metric families of one `Figures`."""

    def __init__(self, figures: Figures) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        figures = self._figures
        up = GaugeMetricFamily("pmx_daemon_up", "1 when pmxd answered this scrape, else 0")
        up.add_metric([], 1 if figures.daemon is not None else 0)
        yield up
        if figures.daemon is None:
            return
        yield from self._daemon(figures)
        yield from self._apps(figures)
        yield from self._instances(figures)

    def _daemon(self, figures: Figures) -> Iterator[Metric]:
        if figures.daemon_memory is not None:
            yield GaugeMetricFamily("pmx_daemon_memory_bytes", "pmxd's resident memory",
                                    value=figures.daemon_memory)
        if figures.daemon_cpu_s is not None:
            yield CounterMetricFamily("pmx_daemon_cpu_seconds", "pmxd's CPU time, user + system",
                                      value=figures.daemon_cpu_s)
        assert figures.daemon is not None
        yield GaugeMetricFamily("pmx_daemon_uptime_seconds", "seconds since pmxd started",
                                value=json_float(figures.daemon.get("uptime")))

    def _apps(self, figures: Figures) -> Iterator[Metric]:
        desired = GaugeMetricFamily("pmx_app_instances_desired",
                                    "the number of instances the app is set to run", labels=["app"])
        online = GaugeMetricFamily("pmx_app_instances_online", "instances online", labels=["app"])
        counters = {
            kind: CounterMetricFamily(f"pmx_app_{kind}", text, labels=["app"])
            for kind, text in (
                ("reloaded_instances", "instances replaced by a zero-downtime reload, "
                                       "seen by this pmx web"),
                ("reload_failures", "reloads that stopped on a failed replacement, "
                                    "seen by this pmx web"),
                ("memory_restarts", "restarts for passing max_memory_restart, "
                                    "seen by this pmx web"))}
        for app in figures.apps:
            name = json_str(app.get("name"))
            spec = app.get("spec")
            count = spec.get("instances") if isinstance(spec, dict) else None
            if isinstance(count, int) and not isinstance(count, bool):
                desired.add_metric([name], count)
            online.add_metric([name], sum(
                1 for row in figures.rows if row.get("name") == name
                and row.get("status") == State.ONLINE and not row.get("replacement")))
            seen = figures.counters.get(name, {})
            for kind, family in counters.items():
                family.add_metric([name], seen.get(kind, 0))
        yield desired
        yield online
        yield from counters.values()

    def _instances(self, figures: Figures) -> Iterator[Metric]:
        labels = ["app", "instance"]
        memory = GaugeMetricFamily("pmx_instance_memory_bytes",
                                   "resident memory of the instance's process tree", labels=labels)
        cpu = CounterMetricFamily("pmx_instance_cpu_seconds",
                                  "CPU time of the instance's process tree", labels=labels)
        restarts = CounterMetricFamily("pmx_instance_restarts", "restarts of the instance",
                                       labels=labels)
        uptime = GaugeMetricFamily("pmx_instance_uptime_seconds",
                                   "seconds since the instance's process started (0 when none runs)",
                                   labels=labels)
        state = GaugeMetricFamily("pmx_instance_state", "1 for the instance's current state",
                                  labels=[*labels, "state"])
        for row in figures.rows:
            if row.get("replacement"):
                continue
            values = [json_str(row.get("name")), str(json_int(row.get("instance")))]
            memory.add_metric(values, json_int(row.get("memory")))
            pid = row.get("pid")
            if isinstance(pid, int) and pid in figures.cpu_seconds:
                cpu.add_metric(values, figures.cpu_seconds[pid])
            restarts.add_metric(values, json_int(row.get("restarts")))
            uptime.add_metric(values, json_float(row.get("uptime")))
            current = json_str(row.get("status"))
            for name in State:
                state.add_metric([*values, name.value], 1 if name.value == current else 0)
        yield from (memory, cpu, restarts, uptime, state)


def exposition(figures: Figures) -> bytes:
    """The Prometheus text format of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PmxCollector(figures))
    return generate_latest(registry)
