"""The registry: every app by name, instance ids, target resolution, the rows `list` shows.

A target on the wire is "all", an app name, or an instance id (digits). `resolve` turns
it into `Target`s: an app with either all its instances or the chosen ones. Names win
over ids (an app cannot be named with digits only, so the two never clash today).
Instance ids are unique for the daemon's life and never reused, as PM2's pm_id.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

from .app import AppGroup
from .config import AppSpec
from .errors import CommandError, PmxError, SpawnError
from .monitor import InstanceStats
from .process import Instance
from .protocol import Json, JsonObject
from .states import ENDED, RUNNING, State

AppFactory = Callable[[AppSpec, Mapping[str, str]], AppGroup]


@dataclass(frozen=True, slots=True)
class Target:
    app: AppGroup
    chosen: list[Instance] | None  # None: the whole app

    @property
    def label(self) -> str:
        """What the user named: the app, or its instances as "app:index"."""
        if self.chosen is None:
            return self.app.name
        return ", ".join(instance.name for instance in self.chosen)


async def for_each(targets: list[Target], verb: str,
                   operation: Callable[[Target], Awaitable[list[str] | None]]) -> JsonObject:
    """Run `operation` on every target at once -> {verb: [labels done], results: one
    {target, ok, error?} per target, errors}; an error of every target is raised instead
    (commands.py's top says more)."""
    outcomes = await asyncio.gather(*(operation(t) for t in targets), return_exceptions=True)
    done: list[Json] = []
    errors: list[Json] = []
    results: list[Json] = []
    failures: list[BaseException] = []
    for resolved, outcome in zip(targets, outcomes, strict=True):
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, PmxError):
                raise outcome
            failures.append(outcome)
            errors.append(str(outcome))
            results.append({"target": resolved.label, "ok": False, "error": str(outcome)})
            continue
        done.append(resolved.label)
        errors.extend(outcome or [])
        results.append({"target": resolved.label, "ok": True})
    if failures and len(failures) == len(targets):
        raise failures[0]
    return {verb: done, "results": results, "errors": errors}


class Registry:
    def __init__(self, make_app: AppFactory, on_change: Callable[[], None] = lambda: None) -> None:
        self.apps: dict[str, AppGroup] = {}
        self._make_app = make_app
        self._on_change = on_change  # an app was added or removed
        self._next_instance_id = 0

    def next_id(self) -> int:
        value = self._next_instance_id
        self._next_instance_id += 1
        return value

    def ids_from(self, first: int) -> None:
        """Ids given from now on are `first` or more (adopted instances keep theirs)."""
        self._next_instance_id = max(self._next_instance_id, first)

    def add(self, spec: AppSpec, base_env: Mapping[str, str]) -> AppGroup:
        """A new app, with no instance started (`pmx update` adopts the running ones)."""
        app = self.apps[spec.name] = self._make_app(spec, base_env)
        self._on_change()
        return app

    def __len__(self) -> int:
        return len(self.apps)

    def __iter__(self) -> Iterator[AppGroup]:
        return iter(list(self.apps.values()))

    def get(self, name: str) -> AppGroup | None:
        return self.apps.get(name)

    def remove(self, name: str) -> None:
        if self.apps.pop(name, None) is not None:
            self._on_change()

    def instances(self) -> Iterator[Instance]:
        for app in list(self.apps.values()):
            yield from app.all_instances()

    def check_idle(self) -> None:
        """Raise `busy` when any app has an operation running."""
        for app in self.apps.values():
            app.check_idle()

    # ------------------------------------------------------------ targets

    def resolve(self, target: str) -> list[Target]:
        """"all", an app name or an instance id -> the apps and instances it names."""
        if target == "all":
            return [Target(app, None) for app in self.apps.values()]
        if target in self.apps:
            return [Target(self.apps[target], None)]
        if target.isascii() and target.isdigit():
            wanted = int(target)
            for app in self.apps.values():
                for instance in app.instances.values():
                    if instance.id == wanted:
                        return [Target(app, [instance])]
        shown = target if len(target) <= 64 else target[:61] + "..."
        raise CommandError("not_found", f'no app or instance id "{shown}"')

    def resolve_all(self, targets: list[str]) -> list[Target]:
        """Several targets -> one Target per app, in the order named: every name is checked
        before anything is done (not_found for the first unknown one), and an app named
        both whole and by instance ids is taken whole, so that no two operations run on
        the same app at once."""
        merged: dict[str, Target] = {}
        for resolved in (t for target in targets for t in self.resolve(target)):
            name = resolved.app.name
            known = merged.get(name)
            if known is None:
                merged[name] = resolved
            elif known.chosen is not None:
                chosen = None if resolved.chosen is None else [
                    *known.chosen, *(i for i in resolved.chosen if i not in known.chosen)]
                merged[name] = Target(resolved.app, chosen)
        return list(merged.values())

    def find_by_pid(self, pid: int) -> Instance | None:
        """The instance whose main process is `pid` or leads `pid`'s process group."""
        try:
            group = os.getpgid(pid)
        except OSError:
            group = -1
        for instance in self.instances():
            if instance.state in RUNNING and instance.pid in (pid, group):
                return instance
        return None

    # ------------------------------------------------------------ starting

    async def start_specs(self, specs: list[AppSpec], base_env: Mapping[str, str], *,
                          skip_existing: bool = False) -> JsonObject:
        """Create (or start again) the apps of `specs` -> {started, already_running, errors}.

        One app's spawn failure is reported in "errors" and does not stop the others. An
        app whose every instance already runs is left alone and named in
        "already_running". An existing app with other settings is refused (unless
        `skip_existing`: resurrect and recovery keep what runs)."""
        for spec in specs:
            existing = self.apps.get(spec.name)
            if existing is not None and existing.spec != spec and not skip_existing:
                raise CommandError(
                    "bad_args", f'app "{spec.name}" already exists with other settings; '
                    f"use `pmx reload FILE` to apply them, or `pmx delete {spec.name}` first")
            if existing is not None:
                existing.check_idle()
        started: list[Json] = []
        running: list[Json] = []
        errors: list[Json] = []
        for spec in specs:
            app = self.apps.get(spec.name)
            created = app is None
            if app is not None and is_running(app):
                running.append(spec.name)
                continue
            if app is None:
                app = self.add(spec, base_env)
            async with app.operation("start"):
                try:
                    problems = await app.start()
                except SpawnError as exc:
                    if created:
                        self.remove(spec.name)
                    errors.append(str(exc))
                    continue
            errors.extend(problems)
            started.append(spec.name)
            await asyncio.sleep(0)  # requests and exits are served during a start of many apps
        return {"started": started, "already_running": running, "errors": errors}

    # ------------------------------------------------------------ rows

    def rows(self, stats: Mapping[int, InstanceStats]) -> list[Json]:
        """One row per instance, in app then slot order. A reload's replacement follows the
        instance it replaces, with the same id and slot, marked "replacement": true."""
        return [instance_row(app, instance, stats) for app in self.apps.values()
                for instance in sorted(app.all_instances(), key=lambda i: (
                    i.index, i.id, app.replacing.get(i.index) is i))]


def is_running(app: AppGroup) -> bool:
    """Every instance the app should have is there and none has ended: nothing to start."""
    return all((instance := app.instances.get(index)) is not None
               and instance.state not in ENDED for index in range(app.spec.instances))


def instance_row(app: AppGroup, instance: Instance, stats: Mapping[int, InstanceStats]) -> JsonObject:
    sample = stats.get(instance.pid or -1)
    running = instance.state not in (*ENDED, State.WAITING)
    return {
        "name": app.name, "id": instance.id, "instance": instance.index,
        "replacement": app.replacing.get(instance.index) is instance,
        "pid": instance.pid if running else None, "status": instance.state.value,
        "reason": instance.reason, "restarts": instance.restarts,
        "cpu": sample.cpu if sample and running else 0.0,
        "memory": sample.memory if sample and running else 0,
        "exec_mode": app.spec.exec_mode, "uptime": round(instance.uptime_s(), 1),
        "since": instance.since,
        "listen": list(app.sockets.bound_addresses()) if app.sockets else [],
    }
