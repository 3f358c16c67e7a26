"""The command handlers: what pmxd does for each request. Each docstring is the spec.

A handler takes the request's `Args` (arguments.py) and returns the reply's result object, or raises
CommandError (its code goes on the wire: bad_args, not_found, busy, failed). `Args`
reads arguments with their types checked, so a malformed request gets `bad_args` and
never reaches the apps. Commands are dispatched through the explicit table `handlers()`
builds: no name from the wire is ever looked up as an attribute.

Batch commands (a target of "all", several apps, or a "targets" list) act on every
target, each app in its own operation, and report one result per target in "results"
(`{"target": "api", "ok": false, "error": "..."}`), plus the labels of the successes
under the verb's key (an app, or its instances as "api:0") and the failures as sentences
in "errors". Every name is resolved before anything is done: an unknown one fails the
whole request (not_found). Only when every target fails is the first failure raised, so
a single-target command fails as a whole.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Protocol

from . import __version__
from .app import AppGroup
from .arguments import Args, json_table, specs_from_request
from .config import AppSpec, mask_env
from .cron import next_run
from .dump import read_dump, write_dump
from .errors import CommandError, ConfigError, PmxError, SpawnError
from .home import DUMP_FILE
from .logs import LogFiles
from .monitor import ResourceMonitor
from .options import Invalid, signal_number
from .protocol import Command, Json, JsonObject, Request
from .registry import Registry, Target, for_each, instance_row, is_running
from .states import ENDED, RUNNING
from .watch import watch_roots

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[JsonObject]]
MAX_INSTANCES = 1024


class Host(Protocol):
    """What the handlers need from the daemon."""

    home: Path
    started: float
    registry: Registry
    monitor: ResourceMonitor
    log_files: LogFiles
    process_tracking: str  # how an instance's processes are found and ended (cgroups.py)

    def publish_event(self, app: str, kind: str, message: str) -> None: ...

    async def start_specs(self, specs: list[AppSpec], base_env: Mapping[str, str], *,
                          skip_existing: bool = False) -> JsonObject: ...

    async def stop_all(self) -> None: ...

    def shut_down_soon(self) -> None: ...

    def update_soon(self) -> None: ...


class Commands:
    def __init__(self, host: Host) -> None:
        self._host = host

    @property
    def _registry(self) -> Registry:
        return self._host.registry

    def handlers(self) -> dict[Command, Handler]:
        table: dict[Command, Callable[[Args], Awaitable[JsonObject]]] = {
            Command.PING: self.ping, Command.LIST: self.list_instances, Command.DESCRIBE: self.describe,
            Command.START: self.start, Command.STOP: self.stop, Command.RESTART: self.restart,
            Command.RELOAD: self.reload, Command.DELETE: self.delete, Command.SCALE: self.scale,
            Command.FLUSH: self.flush, Command.SAVE: self.save, Command.RESURRECT: self.resurrect,
            Command.KILL: self.kill, Command.UPDATE: self.update, Command.RESET: self.reset,
            Command.SIGNAL: self.signal,
        }
        return {command: _with_args(handler) for command, handler in table.items()}

    # ------------------------------------------------------------ reading

    async def ping(self, args: Args) -> JsonObject:
        """Is pmxd there? -> {version, pid, home, started, uptime, apps}."""
        return {"version": __version__, "pid": os.getpid(), "home": str(self._host.home),
                "started": self._host.started,
                "uptime": round(time.time() - self._host.started, 1), "apps": len(self._registry)}

    async def list_instances(self, args: Args) -> JsonObject:
        """Every instance -> {instances: [{name, id, instance, pid, status, reason, restarts,
        cpu, memory, exec_mode, uptime, since, listen}]}, replacements included."""
        return {"instances": self._registry.rows(self._host.monitor.stats)}

    async def describe(self, args: Args) -> JsonObject:
        """target, show_secrets? -> {apps: [{name, spec, mode, listen, unserved, busy,
        watching, cron_next_run, instances}]}: unserved lists listen addresses no instance
        accepts on; watching the absolute paths `watch` names; cron_next_run the epoch time
        of cron_restart's next run (null without one); the full
        settings (secret-looking env values masked unless show_secrets) and, per instance,
        the list row plus its log paths, last exit, unstable restarts, status text, argv."""
        stats = self._host.monitor.stats
        described: list[Json] = []
        for target in self._registry.resolve(args.target()):
            app = target.app
            table = app.spec.to_table()
            env = dict(app.spec.env)
            table["env"] = dict(env if args.flag("show_secrets") else mask_env(env))
            instances: list[Json] = []
            for instance in target.chosen or app.all_instances():
                row = instance_row(app, instance, stats)
                out, err = app.log_paths(instance.index)
                row.update({"out_log": str(out), "error_log": str(err),
                            "last_exit": instance.last_exit,
                            "unstable_restarts": instance.unstable_restarts,
                            "status_text": instance.status_text,
                            "command": list[Json](app.spec.command())})
                instances.append(row)
            described.append({"name": app.name, "spec": json_table(table), "mode": app.mode,
                              "processes": self._host.process_tracking,
                              "listen": list[Json](app.sockets.bound_addresses()
                                                   if app.sockets else []),
                              "unserved": list[Json](app.unserved),
                              "busy": app.busy, "instances": instances,
                              "watching": list[Json](watch_roots(app.spec)),
                              "cron_next_run": next_run(app.spec.cron_restart, time.time())
                              if app.spec.cron_restart else None})
        return {"apps": described}

    # ------------------------------------------------------------ lifecycle

    async def start(self, args: Args) -> JsonObject:
        """Either target or targets (start stopped or errored apps/instances again), or
        apps (a list of app tables, all validated before anything starts) with base_env.
        -> {started: [labels], already_running: [labels], errors: [sentences]}. Starting
        what already runs does nothing and says so (already_running); an app with other
        settings under the same name is refused (bad_args): reload it or delete it first."""
        tables = args.tables()
        if tables is None:
            started: list[Json] = []
            running: list[Json] = []
            errors: list[Json] = []
            for target in self._registry.resolve_all(args.targets()):
                ended = [i for i in target.chosen or [] if i.state in ENDED]
                nothing_to_start = (is_running(target.app) if target.chosen is None
                                    else not ended)
                if nothing_to_start:
                    running.append(target.label)
                    continue
                async with target.app.operation("start"):
                    if target.chosen is None:
                        errors.extend(await target.app.start())
                    else:
                        for instance in ended:
                            try:
                                instance.start("started")
                            except SpawnError as exc:
                                errors.append(str(exc))
                started.append(Target(target.app, ended).label if target.chosen is not None
                               else target.label)
            return {"started": started, "already_running": running, "errors": errors}
        return await self._host.start_specs(specs_from_request(tables), args.env() or {})

    async def stop(self, args: Args) -> JsonObject:
        """target or targets -> {stopped: [labels], results, errors}. Stop signal,
        kill_timeout, SIGKILL."""
        async def stop_one(target: Target) -> None:
            await target.app.preempt()
            async with target.app.operation("stop"):
                if target.chosen is None:
                    await target.app.stop()
                else:
                    await asyncio.gather(*(inst.stop() for inst in target.chosen))

        return await self._each(args.targets(), "stopped", stop_one)

    async def restart(self, args: Args) -> JsonObject:
        """target or targets -> {restarted: [labels], results, errors}: stop, then start (a gap;
        `reload` has none). A spawn failure is reported in errors, the instance errored."""
        async def restart_one(target: Target) -> list[str]:
            await target.app.preempt()
            async with target.app.operation("restart"):
                if target.chosen is None:
                    return await target.app.restart()
                errors = []
                for instance in target.chosen:
                    try:
                        await instance.restart("restarting")
                    except SpawnError as exc:
                        errors.append(str(exc))
                return errors

        return await self._each(args.targets(), "restarted", restart_one)

    async def reload(self, args: Args) -> JsonObject:
        """target(s) or apps, + base_env, update_env -> {reloaded: [names], results, errors, started?}.

        Each app in turn: replace its instances one at a time (see AppGroup.reload). With
        apps, changed settings are applied and unknown apps are started. A replacement
        that fails stops the reload (failed); the old instances keep serving and the app
        keeps its previous settings. Changing a cluster's listen addresses is refused.
        With update_env, the apps take base_env as their environment from now on."""
        tables = args.tables()
        if tables is None:
            targets = self._registry.resolve_all(args.targets())
            env = args.env()
            if args.flag("update_env") and env is not None:
                for target in targets:  # PM2's `reload NAME --update-env`
                    target.app.check_idle()
                    target.app.base_env = env
            return await self._reload_apps([(t.app, None) for t in targets])
        specs = specs_from_request(tables)
        base_env = args.env() or {}
        new_apps = [spec for spec in specs if self._registry.get(spec.name) is None]
        changed: list[tuple[AppGroup, AppSpec | None]] = []
        for spec in specs:
            app = self._registry.get(spec.name)
            if app is None:
                continue
            if app.spec.is_cluster and (spec.listen != app.spec.listen
                                        or spec.reuse_port != app.spec.reuse_port):
                raise CommandError("bad_args", f'app "{app.name}": changing listen addresses '
                                   "needs `pmx delete` then `pmx start`")
            changed.append((app, spec))
        if args.flag("update_env") and args.env() is not None:
            for app, _ in changed:
                app.base_env = dict(base_env)
        result = await self._reload_apps(changed)
        if new_apps:
            started = await self._host.start_specs(new_apps, base_env)
            result["started"] = started["started"]
            problems = started.get("errors")  # a new app that could not start is said, too
            known = result.get("errors")
            if isinstance(problems, list) and isinstance(known, list):
                result["errors"] = [*known, *problems]
        return result

    async def _reload_apps(self, targets: list[tuple[AppGroup, AppSpec | None]], *,
                           automatic: bool = False) -> JsonObject:
        for app, _ in targets:
            if not automatic:
                await app.preempt()
            app.check_idle()
        reloaded: list[Json] = []
        for app, new_spec in targets:
            def progress(message: str, app_name: str = app.name) -> None:
                log.info("reload: %s", message)
                self._host.publish_event(app_name, "reload", message)

            async with app.operation("reload", automatic=automatic):
                previous = app.spec
                try:
                    await app.reload(progress, new_spec)
                except SpawnError as exc:
                    # A failed reload keeps the last working settings: the instances not
                    # yet replaced, and any later crash restart, use the old spec.
                    app.spec = previous
                    self._host.publish_event(app.name, "reload_failed", str(exc))
                    raise CommandError("failed", f'reload of "{app.name}" stopped: {exc}; '
                                       "the old instances keep serving") from None
            reloaded.append(app.name)
        return {"reloaded": reloaded, "results": [{"target": n, "ok": True} for n in reloaded],
                "errors": []}

    async def reload_because(self, app: AppGroup, reason: str) -> None:
        """Not a request: a reload pmxd starts by itself (a watched file changed, a cron
        time) takes the path of `pmx reload NAME`, its reason in the events and the log."""
        log.info("%s: reload: %s", app.name, reason)
        self._host.publish_event(app.name, "reload", reason)
        await self._reload_apps([(app, None)], automatic=True)

    async def reset(self, args: Args) -> JsonObject:
        """target or targets -> {reset: [labels], results, errors}: restart counters to 0
        (PM2's `pm2 reset`). Instant: allowed while an operation runs."""
        async def reset_one(target: Target) -> None:
            for instance in target.chosen or target.app.all_instances():
                instance.reset_counters()

        return await self._each(args.targets(), "reset", reset_one)

    async def signal(self, args: Args) -> JsonObject:
        """signal (a name like "SIGUSR2" or a number), target or targets -> {signalled:
        [labels], results, errors}: sent to each running instance's main process (PM2's
        `pm2 sendSignal`). bad_args for an unknown signal; failed for a target of which
        nothing runs."""
        raw = args.text("signal")
        try:
            signum = signal_number(raw)
        except Invalid as exc:
            raise CommandError("bad_args", f'unknown signal "{raw[:32]}": expected {exc}') from None

        async def signal_one(target: Target) -> None:
            chosen = target.chosen or target.app.all_instances()
            sent = [i for i in chosen if i.state in RUNNING and i.send_signal(signum)]
            if not sent:
                raise CommandError("failed", f"nothing of {target.label} runs: no signal sent")

        return await self._each(args.targets(), "signalled", signal_one)

    async def delete(self, args: Args) -> JsonObject:
        """target or targets -> {deleted: [names or "app:index"], results, errors}: stop and
        forget.
        Deleting some instances of an app lowers its instance count (at least 1)."""
        order = [target.app.name for target in self._registry.resolve_all(args.targets())]
        deleted: dict[str, list[str]] = {}  # by app, listed in the order the user named them

        async def delete_one(target: Target) -> None:
            app = target.app
            await app.preempt()
            async with app.operation("delete"):
                if target.chosen is None or len(target.chosen) == len(app.instances):
                    await app.delete()
                    self._registry.remove(app.name)
                    deleted[app.name] = [app.name]
                    self._host.publish_event(app.name, "removed", f'app "{app.name}" deleted')
                else:
                    for instance in target.chosen:
                        await instance.stop("deleted")
                        app.instances.pop(instance.index, None)
                    app.spec = app.spec.with_instances(max(1, len(app.instances)))
                    deleted[app.name] = [instance.name for instance in target.chosen]

        result = await self._each(args.targets(), "deleted", delete_one)
        result["deleted"] = [label for name in order for label in deleted.get(name, [])]
        return result

    async def scale(self, args: Args) -> JsonObject:
        """target (an app name), count ("4", "+2", "-1") -> {app, instances, errors}.
        Instances that stay are untouched; 1 to 1024 instances."""
        name = args.target()
        app = self._registry.get(name)
        if app is None:
            raise CommandError("not_found", f"no app named {name!r}")
        wanted = args.count(app.spec.instances)
        if not 1 <= wanted <= MAX_INSTANCES:
            raise CommandError("bad_args", f"cannot scale {name} to {wanted} instances "
                                           f"(1 to {MAX_INSTANCES})")
        async with app.operation("scale"):
            errors = await app.scale(wanted)
        return {"app": name, "instances": wanted, "errors": list[Json](errors)}

    # ------------------------------------------------------------ files

    async def flush(self, args: Args) -> JsonObject:
        """target? (default all) -> {flushed: [paths]}: empty the apps' log files."""
        flushed: list[Json] = []
        target = args.target() if args.has("target") else "all"
        for resolved in self._registry.resolve(target):
            app = resolved.app
            paths: set[Path] = set()
            for index in range(max(app.spec.instances, len(app.instances))):
                paths.update(app.log_paths(index))
            self._host.log_files.flush(paths, app.spec)
            flushed.extend(str(p) for p in sorted(paths))
        return {"flushed": flushed}

    async def save(self, args: Args) -> JsonObject:
        """force? -> {path, apps}: write every app's settings to the dump, atomically.
        Saving no app over a dump that holds some needs force (bad_args otherwise)."""
        path = self._host.home / DUMP_FILE
        specs = [app.spec for app in self._registry]
        if not specs and not args.flag("force"):
            try:
                previous = read_dump(path)
            except PmxError:
                previous = []
            if previous:
                raise CommandError("bad_args", f"no app is running, and {path} holds "
                                   f"{len(previous)} apps; use --force to save an empty list")
        write_dump(path, specs)
        return {"path": str(path), "apps": len(specs)}

    async def resurrect(self, args: Args) -> JsonObject:
        """base_env? -> {started, already_running, errors, path}: start the dump's apps that
        do not run. No dump: failed ("run pmx save first"). A dump that is not a valid
        ecosystem file: bad_args, as a bad config file is (exit 2)."""
        path = self._host.home / DUMP_FILE
        if not path.exists():
            raise CommandError("failed", f"no dump at {path}; run pmx save first")
        try:
            specs = read_dump(path)
        except ConfigError as exc:
            raise CommandError("bad_args", str(exc)) from None
        env = args.env()
        result = await self._host.start_specs(specs, dict(os.environ) if env is None else env,
                                              skip_existing=True)
        result["path"] = str(path)
        return result

    # ------------------------------------------------------------ the daemon itself

    async def kill(self, args: Args) -> JsonObject:
        """-> {pid, stopped}: stop every app, reply, then pmxd exits."""
        await self._host.stop_all()
        self._host.shut_down_soon()
        return {"pid": os.getpid(), "stopped": True}

    async def update(self, args: Args) -> JsonObject:
        """-> {pid, apps}: replace this pmxd with the installed version, in place (same pid).

        The apps keep running: the new image adopts every running process with its
        pipes, pidfd, IPC channel and listening sockets (handover.py); only a slot that
        was stopping or waiting to restart is started again. Refused (busy) while any app
        has an operation running."""
        self._registry.check_idle()
        self._host.update_soon()
        return {"pid": os.getpid(), "apps": len(self._registry)}

    # ------------------------------------------------------------ batches

    async def _each(self, names: list[str], verb: str,
                    operation: Callable[[Target], Awaitable[list[str] | None]]) -> JsonObject:
        return await for_each(self._registry.resolve_all(names), verb, operation)


def _with_args(handler: Callable[[Args], Awaitable[JsonObject]]) -> Handler:
    async def handle(request: Request) -> JsonObject:
        return await handler(Args(request.args))

    handle.__doc__ = handler.__doc__
    return handle
