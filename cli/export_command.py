"""`pmx export kubernetes | systemd | compose ecosystem.toml`: the same ecosystem file as
the source for the next platform. Works on the file alone: no pmxd is needed or started.

Without `-o` the files go to stdout (a secrets file with its values masked, or, for
compose, left out); with `-o DIR` they are written there, secrets files with mode 0600:
kubernetes writes one NAME.yaml per app, systemd its units (NAME@.service, NAME.socket,
NAME.env, ...), compose one compose.yaml (and NAME.env). What a target cannot express is
listed in a comment in the output and on stderr, one line per option. Registered on the
`pmx` group by main.py; the targets are export_kubernetes.py, export_systemd.py and
export_compose.py, their shared part export_common.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import usage
from .outcome import handles_errors

if TYPE_CHECKING:  # export_common (and yaml) load only when a target runs
    from .export_common import OutFile, Report

F = Callable[..., None]


@click.group(name="export", cls=usage.PmxGroup)
def export_group() -> None:
    """Write Kubernetes, systemd or compose files from an ecosystem file."""


def _common(function: F) -> F:
    """The options every target takes: the file, -o, --env and --only."""
    function = click.option("--only", multiple=True, metavar="APP", help="export only this app")(function)
    function = click.option("--env", "env_name", metavar="NAME",
                            help="merge the apps' env_NAME tables over env")(function)
    function = click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path),
                            help="write the files into this folder (default: stdout)")(function)
    return click.argument("file", type=click.Path(dir_okay=False))(function)


def _image_options(function: F) -> F:
    function = click.option("--max-instances", type=click.IntRange(1, 1024), default=2, show_default=True,
                            help='replicas for instances = "max"')(function)
    function = click.option("--workdir", default="/app", show_default=True,
                            help="where the ecosystem file's folder is in the image")(function)
    return click.option("--image", help="the image of the apps ({name}: the app's name; default: "
                                        "the ecosystem folder's name:latest)")(function)


@export_group.command()
@_common
@_image_options
@click.option("--namespace", metavar="NS", help="metadata.namespace of every object")
@click.option("--kubectl-image", default="registry.k8s.io/kubectl:v1.33.0", show_default=True,
              help="the image of the cron_restart CronJob")
@handles_errors
def kubernetes(file: str, out_dir: Path | None, env_name: str | None, only: tuple[str, ...],
               image: str | None, workdir: str, max_instances: int, namespace: str | None,
               kubectl_image: str) -> None:
    """Deployments (and Services, CronJobs): one NAME.yaml per app with -o."""
    from . import export_kubernetes
    from .export_common import load_apps

    apps = load_apps(file, env_name=env_name, only=only)
    options = export_kubernetes.Options(_image(file, image), namespace, workdir, max_instances,
                                        kubectl_image)
    files, reports = export_kubernetes.export(apps, options, file)
    _finish(files, reports, out_dir, separate=False)


@export_group.command()
@_common
@handles_errors
def systemd(file: str, out_dir: Path | None, env_name: str | None, only: tuple[str, ...]) -> None:
    """Template units NAME@.service, socket units, env files, cron_restart timers."""
    from . import export_systemd
    from .export_common import load_apps

    apps = load_apps(file, env_name=env_name, only=only)
    files, reports = export_systemd.export(apps, file)
    _finish(files, reports, out_dir, separate=True)


@export_group.command()
@_common
@_image_options
@handles_errors
def compose(file: str, out_dir: Path | None, env_name: str | None, only: tuple[str, ...],
            image: str | None, workdir: str, max_instances: int) -> None:
    """One compose.yaml with a service per app (and NAME.env for secrets with -o)."""
    from . import export_compose
    from .export_common import load_apps

    apps = load_apps(file, env_name=env_name, only=only)
    options = export_compose.Options(_image(file, image), workdir, max_instances)
    files, reports = export_compose.export(apps, options, file)
    _finish(files, reports, out_dir, separate=False)


def _image(file: str, image: str | None) -> str:
    if image:
        return image
    from .export_common import dns_label

    default = f"{dns_label(Path(file).resolve().parent.name)}:latest"
    click.echo(f"pmx export: no --image: the apps run {default}", err=True)
    return default


def _finish(outs: Sequence[OutFile], reports: Sequence[Report], out_dir: Path | None, *,
            separate: bool) -> None:
    """Write or print the files; every report line to stderr."""
    from .export_common import write_files

    for report in reports:
        for line in report.lines():
            click.echo(f"pmx export: {line}", err=True)
    if out_dir is not None:
        written = write_files(outs, out_dir)
        click.echo(f"[pmx] wrote {', '.join(str(path) for path in written)}")
        return
    for out in outs:
        text = out.text if out.mode != 0o600 else out.masked
        if text is None:
            click.echo(f"pmx export: {out.name} holds secret values: written only with -o DIR "
                       "(mode 0600)", err=True)
            continue
        if separate:  # several unit files in one stream: say where each begins
            click.echo(f"# ==> {out.name} <==")
        click.echo(text, nl=False)
        if separate:
            click.echo()


COMMANDS = (export_group,)
