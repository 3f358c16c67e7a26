"""Reading a request: its arguments with their types checked, and the app tables it carries.

Anything malformed is a CommandError with code `bad_args`, so it never reaches the apps.
"""

from __future__ import annotations

from collections.abc import Mapping

from .config import AppSpec, spec_from_table
from .errors import CommandError, ConfigError
from .protocol import Json, JsonObject

MAX_TARGETS = 1024


class Args:
    """A request's arguments, read with their types checked (else `bad_args`)."""

    def __init__(self, args: JsonObject) -> None:
        self._args = args

    def has(self, key: str) -> bool:
        return key in self._args

    def target(self) -> str:
        value = self._args.get("target")
        if not isinstance(value, str) or not value:
            raise CommandError("bad_args", '"target" must be an app name, an id or "all"')
        return value

    def targets(self) -> list[str]:
        """"targets" (a non-empty list of names, ids or "all"), else the one "target"."""
        if "targets" not in self._args:
            return [self.target()]
        values = self._args.get("targets")
        if not isinstance(values, list) or not values or len(values) > MAX_TARGETS or not all(
                isinstance(value, str) and value for value in values):
            raise CommandError("bad_args", '"targets" must be a non-empty list of app names, '
                                           'ids or "all"')
        return [str(value) for value in values]

    def text(self, key: str) -> str:
        """A non-empty string argument, else bad_args."""
        value = self._args.get(key)
        if not isinstance(value, str) or not value:
            raise CommandError("bad_args", f'"{key}" must be a non-empty string')
        return value

    def flag(self, key: str) -> bool:
        return self._args.get(key) is True

    def tables(self) -> list[Json] | None:
        """The "apps" list of app tables, when given; an empty one is refused."""
        tables = self._args.get("apps")
        if tables is None:
            return None
        if not isinstance(tables, list) or not tables:
            raise CommandError("bad_args", '"apps" must be a non-empty list of app tables')
        return tables

    def env(self, key: str = "base_env") -> dict[str, str] | None:
        """An environment object: string values only (others are dropped); None if absent."""
        value = self._args.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise CommandError("bad_args", f'"{key}" must be an object of strings')
        return {str(k): v for k, v in value.items() if isinstance(v, str)}

    def count(self, current: int) -> int:
        """"count": "4", "+2" or "-1" -> the wanted number of instances."""
        count = self._args.get("count")
        digits = count.lstrip("+-") if isinstance(count, str) else ""
        if not isinstance(count, str) or not (digits.isascii() and digits.isdigit()):
            raise CommandError("bad_args", 'count must be a number like 4, "+2" or "-1"')
        return current + int(count) if count[0] in "+-" else int(count)


def specs_from_request(tables: list[Json]) -> list[AppSpec]:
    """Validate the app tables a client sent; a bad one refuses the whole request."""
    specs: list[AppSpec] = []
    for index, table in enumerate(tables):
        if not isinstance(table, dict):
            raise CommandError("bad_args", f"apps[{index}] must be an object")
        try:
            specs.append(spec_from_table(table, source=f"request apps[{index}]"))
        except ConfigError as exc:
            raise CommandError("bad_args", str(exc)) from None
    return specs


def json_table(table: Mapping[str, object]) -> JsonObject:
    result: JsonObject = {}
    for key, value in table.items():
        if isinstance(value, str | int | float | bool) or value is None:
            result[key] = value
        elif isinstance(value, list):
            result[key] = [str(v) for v in value]
        elif isinstance(value, dict):
            result[key] = {str(k): str(v) for k, v in value.items()}
    return result
