"""Reading the command line: options wherever they stand, the app's arguments after `--`,
and click's usage errors turned into one line (`pmx: ...`, exit 2).

click reports a usage error in three lines (usage, a hint, the error); pmx promises one
line for every error, so `main` runs the group without click's standalone handling and
formats the exception with `one_line`. Used by main.py; click only, difflib on errors.
"""

from __future__ import annotations

from typing import NoReturn

import click
from pmx.supervisor.errors import ExitCode

from .outcome import fail

APP_ARGS = "app_args"  # ctx.meta key: the words after `--`
TABLE_OPTION = click.option("-t", "--table", "show_table", is_flag=True,
                            help="then show the instance table, as pmx list does")


class UsageError(click.UsageError):
    """A usage error in pmx's own words, shown as it is."""


class PmxGroup(click.Group):
    """The `pmx` group and its subgroups (`pmx export`): an unknown command is named in
    quotes, as every name from the command line is, and gets a did-you-mean."""

    def resolve_command(self, ctx: click.Context, args: list[str]
                        ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            import difflib

            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1, cutoff=0.6)
            hint = f'; did you mean "{close[0]}"?' if close else f"; see {ctx.command_path} --help"
            raise UsageError(f'no such command "{name}"{hint}', ctx)
        return super().resolve_command(ctx, args)


class AppArgsCommand(click.Command):
    """A command that runs an app: pmx's options are read wherever they stand (before or
    after the script), an unknown one is an error, and only the words after `--` go to
    the app (`app_args()`), as PM2 users expect."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            ctx.meta[APP_ARGS] = tuple(args[cut + 1:])
            args = args[:cut]
        ctx.allow_extra_args = True  # so that a stray word gets the message below
        remaining = super().parse_args(ctx, args)
        if ctx.args:
            import shlex

            raise UsageError(
                f'unexpected argument "{ctx.args[0]}"; arguments for the app go after --, '
                f"as in pmx {ctx.info_name} SCRIPT -- {shlex.join(ctx.args)}", ctx)
        return remaining


def app_args() -> tuple[str, ...]:
    """The words after `--` on the current command line."""
    value = click.get_current_context().meta.get(APP_ARGS, ())
    return tuple(value)


def refuse(message: str) -> NoReturn:
    """A usage mistake click cannot see: one line, exit 2."""
    fail(message, ExitCode.USAGE)
    raise AssertionError("unreachable")  # fail() exits


def one_line(error: click.ClickException) -> str:
    """A click error as one line without a trailing period, naming where to read more."""
    context = getattr(error, "ctx", None)
    where = f"; see {context.command_path} --help" if isinstance(context, click.Context) else ""
    if isinstance(error, click.NoSuchOption):
        found = sorted(error.possibilities or [])
        hint = f"; did you mean {' or '.join(found)}?" if found else where
        return f"no such option {error.option_name}{hint}"
    if isinstance(error, click.MissingParameter) and error.param is not None:
        kind = error.param_type or error.param.param_type_name
        return f"missing {kind} {_param_name(error.param)}{where}"
    if isinstance(error, click.BadParameter) and error.param is not None:
        return f"{_param_name(error.param)}: {error.message.rstrip('.')}"
    message = error.format_message()
    if isinstance(error, UsageError):
        return message
    message = message.rstrip(".")
    return message[:1].lower() + message[1:] + where  # click's own words


def _param_name(param: click.Parameter) -> str:
    if isinstance(param, click.Option):
        return max(param.opts, key=len)
    return param.human_readable_name
