"""`pmx startup` / `pmx unstartup`: run pmxd at boot as a systemd or launchd service.

Renders packaging/pmx.service.in (systemd) or packaging/pmx.plist.in (launchd) for one
user and installs it:

    root, systemd      /etc/systemd/system/pmx-USER.service, User=USER, WantedBy=multi-user
    a user, systemd    ~/.config/systemd/user/pmx.service (a user unit; needs lingering to
                       start at boot without a login)
    root, launchd      /Library/LaunchDaemons/pmx.USER.plist, UserName=USER
    a user, launchd    ~/Library/LaunchAgents/pmx.USER.plist

The service runs `pmxd --foreground --resurrect`: it starts the apps of the last `pmx save`.
Installing only enables the unit (it starts at the next boot or login): starting it now
while a pmxd already runs in the same home would fail on the home's lock, so we print the
hand-over commands instead.

What can go wrong is reported in one line, never with a traceback: no systemctl (a
container), systemctl refusing, a template missing from a broken install, a unit folder
we may not write. A failed install leaves the previous unit file as it was.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path
from xml.sax.saxutils import escape as xml_escape

from pmx.supervisor.errors import ExitCode, PmxError

TEMPLATES = {"systemd": "pmx.service.in", "launchd": "pmx.plist.in"}
SYSTEMD_RUNTIME_DIR = Path("/run/systemd/system")
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
LAUNCH_DAEMONS_DIR = Path("/Library/LaunchDaemons")
LINGER_DIR = Path("/var/lib/systemd/linger")
SYSTEMCTL_TIMEOUT_S = 60.0

_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
_CONDITION = "@IF_SYSTEM@"


class StartupError(PmxError):
    """A service could not be described or installed; the message says what to do."""


@dataclasses.dataclass(frozen=True, slots=True)
class Service:
    """What to install: which init system, for whom, running which pmxd in which home."""

    init: str  # "systemd" or "launchd"
    user: str
    group: str
    user_home: Path
    pmx_home: Path
    is_system: bool  # a system unit (installed by root, with User=) or the user's own

    @property
    def name(self) -> str:
        """The unit's file name: pmx-USER.service, pmx.service or pmx.USER.plist."""
        if self.init == "launchd":
            return f"{self.label}.plist"
        return f"pmx-{self.user}.service" if self.is_system else "pmx.service"

    @property
    def label(self) -> str:
        return f"pmx.{self.user}"

    def default_dir(self) -> Path:
        if self.init == "launchd":
            return LAUNCH_DAEMONS_DIR if self.is_system else \
                self.user_home / "Library" / "LaunchAgents"
        if self.is_system:
            return SYSTEM_UNIT_DIR
        config = os.environ.get("XDG_CONFIG_HOME") or str(self.user_home / ".config")
        return Path(config) / "systemd" / "user"

    def systemctl(self, *args: str) -> list[str]:
        return ["systemctl", *(() if self.is_system else ("--user",)), *args]


# ---------------------------------------------------------------- describing the service


def detect_init() -> str:
    """The init system of this machine, or a StartupError saying how to name it."""
    if sys.platform == "darwin":
        return "launchd"
    if SYSTEMD_RUNTIME_DIR.is_dir():
        return "systemd"
    raise StartupError("cannot tell the init system: this is not macOS, and systemd is not "
                       f"running (no {SYSTEMD_RUNTIME_DIR}; a container?). Name it, as in "
                       "`pmx startup systemd`, or in a container make `pmxd --foreground` the "
                       "entry point (see packaging/Dockerfile)")


def platform_init() -> str:
    """The init system this platform's services use, without looking at what runs."""
    return "launchd" if sys.platform == "darwin" else "systemd"


def find_pmxd() -> Path:
    """The installed pmxd: beside this Python (a venv's bin), else the first one on PATH."""
    beside = Path(sys.executable).parent / "pmxd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return Path(os.path.abspath(beside))
    found = shutil.which("pmxd")
    if found:
        return Path(os.path.abspath(found))
    raise StartupError(f"cannot find the pmxd program (not beside {sys.executable}, not on "
                       "PATH); is pmx installed in this environment?")


def describe_service(init: str, *, user: str | None = None, pmx_home: str | None = None) -> Service:
    """The service for `user` (default: you, or SUDO_USER when root runs this through sudo)."""
    is_root = os.geteuid() == 0
    if user is None:
        sudo_user = os.environ.get("SUDO_USER")
        user = sudo_user if is_root and sudo_user and sudo_user != "root" else \
            pwd.getpwuid(os.geteuid()).pw_name
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise StartupError(f'no user named "{user}" on this machine') from None
    if not is_root and account.pw_uid != os.geteuid():
        raise StartupError(f'only root can install pmx for another user ("{user}"); run it as '
                           f"root, or without --user to install it for yourself")
    try:
        group = grp.getgrgid(account.pw_gid).gr_name
    except KeyError:
        group = str(account.pw_gid)
    user_home = Path(account.pw_dir)
    if pmx_home is None and account.pw_uid == os.geteuid():
        pmx_home = os.environ.get("PMX_HOME") or None
    home = Path(os.path.abspath(os.path.expanduser(pmx_home))) if pmx_home else user_home / ".pmx"
    return Service(init=init, user=user, group=group, user_home=user_home, pmx_home=home,
                   is_system=is_root)


def service_path_env(pmxd: Path) -> str:
    """This shell's PATH with pmxd's folder first, so apps find `node`, `pmx` and friends."""
    entries = [str(pmxd.parent)]
    for entry in os.environ.get("PATH", os.defpath).split(os.pathsep):
        if entry and entry not in entries:
            entries.append(entry)
    return os.pathsep.join(entries)


def template_path(init: str) -> Path:
    """packaging/<template>: beside the pmx.cli package, in a checkout or an installed tree."""
    path = Path(__file__).resolve().parent.parent / "packaging" / TEMPLATES[init]
    if not path.is_file():
        raise StartupError(f"cannot find the {init} template {path}; this pmx installation is "
                           "incomplete, reinstall it")
    return path


def render(template: str, values: dict[str, str], *, is_system: bool) -> str:
    """Fill @NAME@ placeholders; lines starting with @IF_SYSTEM@ only go into system units."""
    lines = []
    for line in template.splitlines(keepends=True):
        if line.startswith(_CONDITION):
            if not is_system:
                continue
            line = line[len(_CONDITION):]
        lines.append(line)

    def fill(match: re.Match[str]) -> str:
        return values[match.group(1)]  # a KeyError is a bug in the template or in this file

    return _PLACEHOLDER.sub(fill, "".join(lines))


def _check_value(what: str, value: str) -> str:
    if any(char in value for char in "\n\r\0"):
        raise StartupError(f"{what} contains a line break or NUL, which a unit file cannot hold: "
                           f"{value!r}")
    return value


def _systemd_quoted(text: str) -> str:
    """One systemd word: quoted when it holds blanks or quotes; % escaped (specifiers)."""
    text = text.replace("%", "%%")
    if re.search(r"[\s\"'\\]", text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def unit_text(service: Service, pmxd_path: Path | None = None) -> str:
    """The rendered unit (systemd) or property list (launchd) for `service`."""
    program = pmxd_path or find_pmxd()
    pmx_home = _check_value("PMX_HOME", str(service.pmx_home))
    pmxd = _check_value("the pmxd path", str(program))
    path_env = _check_value("PATH", service_path_env(program))
    template = template_path(service.init).read_text()
    values = {"USER": service.user, "GROUP": service.group}
    if service.init == "systemd":
        values.update({
            "ENV_PMX_HOME": _systemd_quoted(f"PMX_HOME={pmx_home}"),
            "ENV_PATH": _systemd_quoted(f"PATH={path_env}"),
            # ExecStart also expands $VARIABLES: a literal $ is written $$.
            "PMXD": _systemd_quoted(pmxd).replace("$", "$$"),
            "WANTED_BY": "multi-user.target" if service.is_system else "default.target",
        })
    else:
        values = {key: xml_escape(value) for key, value in values.items()}
        values.update({"LABEL": xml_escape(service.label), "PMXD": xml_escape(pmxd),
                       "PMX_HOME": xml_escape(pmx_home), "PATH": xml_escape(path_env)})
    return render(template, values, is_system=service.is_system)


# ---------------------------------------------------------------- installing


def _echo(message: str) -> None:
    print(f"[pmx] {message}", flush=True)


def _run(command: list[str]) -> tuple[bool, str]:
    """Run systemctl/launchctl: (succeeded, its last line of output or why it could not run)."""
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                text=True, timeout=SYSTEMCTL_TIMEOUT_S, check=False)
    except FileNotFoundError:
        return False, f"{command[0]} is not installed here"
    except subprocess.TimeoutExpired:
        return False, f"{command[0]} did not finish within {SYSTEMCTL_TIMEOUT_S:g}s"
    except OSError as exc:
        return False, f"cannot run {command[0]}: {exc.strerror or exc}"
    output = [line.strip() for line in (result.stderr + result.stdout).splitlines()
              if line.strip()]
    detail = output[-1].rstrip(".") if output else f"exit status {result.returncode}"
    return result.returncode == 0, detail


def _write_atomically(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(text)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot write {path}: {exc.strerror or exc}") from None


def _restore(path: Path, previous: str | None) -> None:
    """Put back what was at `path` before a failed install."""
    try:
        if previous is None:
            path.unlink(missing_ok=True)
        else:
            _write_atomically(path, previous)
    except (OSError, StartupError) as exc:
        _echo(f"could not restore {path}: {exc}")


def install(service: Service, unit_dir: Path | None = None) -> int:
    """Write the unit and enable it; the exit code for the CLI."""
    path = (unit_dir or service.default_dir()) / service.name
    text = unit_text(service)
    try:
        previous: str | None = path.read_text()
    except FileNotFoundError:
        previous = None
    except OSError as exc:
        raise StartupError(f"cannot read {path}: {exc.strerror or exc}") from None
    _write_atomically(path, text)
    if service.init == "launchd":
        return _after_launchd_install(service, path)
    return _enable_systemd(service, path, previous)


def _left_as_it_was(path: Path, previous: str | None) -> str:
    return f"{path} was not installed" if previous is None else f"{path} is as it was before"


def _wrote(service: Service, path: Path) -> None:
    _echo(f"wrote {path} (pmxd as {service.user}, PMX_HOME {service.pmx_home})")


def _enable_systemd(service: Service, path: Path, previous: str | None) -> int:
    running = SYSTEMD_RUNTIME_DIR.is_dir()
    ok, detail = _run(service.systemctl("daemon-reload"))
    if not ok and running:
        _restore(path, previous)
        raise StartupError(f"`{' '.join(service.systemctl('daemon-reload'))}` failed: {detail}; "
                           f"{_left_as_it_was(path, previous)}")
    ok, detail = _run(service.systemctl("enable", service.name))
    if not ok:
        _restore(path, previous)
        hint = ("; in a container, make `pmxd --foreground` the entry point instead "
                "(see packaging/Dockerfile)") if not running else ""
        raise StartupError(f"`{' '.join(service.systemctl('enable', service.name))}` failed: "
                           f"{detail}; {_left_as_it_was(path, previous)}{hint}")
    _wrote(service, path)
    start = " ".join(service.systemctl("start", service.name.removesuffix(".service")))
    if running:
        _echo(f"enabled {service.name}: pmxd starts "
              f"{'at boot' if service.is_system else 'when ' + service.user + ' logs in'} with "
              "the apps of the last `pmx save`")
        _echo(f"to hand the running apps over to systemd now: pmx save && pmx kill && {start}")
    else:
        _echo(f"enabled {service.name} offline: systemd is not running on this machine "
              f"(no {SYSTEMD_RUNTIME_DIR}), so pmxd starts when it boots with systemd")
    if not service.is_system and not (LINGER_DIR / service.user).exists():
        _echo(f"a user unit starts at {service.user}'s first login; to start it at boot "
              f"without one, run: loginctl enable-linger {service.user}")
    _echo("run `pmx save` whenever your apps change: the service starts the last saved list")
    return int(ExitCode.OK)


def _after_launchd_install(service: Service, path: Path) -> int:
    # launchd opens the log file before pmxd runs: the home must exist (0700, as pmxd wants).
    try:
        service.pmx_home.mkdir(mode=0o700, parents=True, exist_ok=True)
        if service.is_system:
            account = pwd.getpwnam(service.user)
            os.chown(service.pmx_home, account.pw_uid, account.pw_gid)
    except OSError as exc:
        raise StartupError(f"cannot create {service.pmx_home}: {exc.strerror or exc}") from None
    _wrote(service, path)
    when = "at boot" if service.is_system else f"when {service.user} logs in"
    _echo(f"launchd starts pmxd {when} with the apps of the last `pmx save`")
    _echo(f"to hand the running apps over to launchd now: pmx save && pmx kill && "
          f"launchctl load -w {path}")
    _echo("run `pmx save` whenever your apps change: the service starts the last saved list")
    return int(ExitCode.OK)


def uninstall(service: Service, unit_dir: Path | None = None) -> int:
    """Disable and remove the unit; a pmxd it started keeps running until `pmx kill`."""
    path = (unit_dir or service.default_dir()) / service.name
    if not path.exists():
        _echo(f"nothing to remove: there is no {path}")
        return int(ExitCode.OK)
    if service.init == "systemd":
        ok, detail = _run(service.systemctl("disable", service.name))
        if not ok and shutil.which("systemctl") is not None:
            raise StartupError(f"`{' '.join(service.systemctl('disable', service.name))}` "
                               f"failed: {detail}; {path} is still there")
    else:
        _run(["launchctl", "unload", "-w", str(path)])  # fails when it is not loaded: fine
    try:
        path.unlink()
    except OSError as exc:
        raise StartupError(f"cannot remove {path}: {exc.strerror or exc}") from None
    if service.init == "systemd" and SYSTEMD_RUNTIME_DIR.is_dir():
        _run(service.systemctl("daemon-reload"))
    _echo(f"removed {path}; a pmxd it started keeps running until `pmx kill`")
    return int(ExitCode.OK)


def startup(init: str | None, *, print_only: bool, user: str | None, pmx_home: str | None,
            unit_dir: str | None) -> int:
    """Install the service, or with print_only show it. Printing detects nothing: it shows
    the unit of the init system named, else this platform's (launchd on macOS, else
    systemd), so it works where systemd does not run (a container, a build machine)."""
    if init is None:
        init = platform_init() if print_only else detect_init()
    service = describe_service(init, user=user, pmx_home=pmx_home)
    if print_only:
        sys.stdout.write(unit_text(service))
        return int(ExitCode.OK)
    if unit_dir is None and (service.init == "launchd") != (sys.platform == "darwin"):
        raise StartupError(f"{service.init} does not run on this system; "
                           f"`pmx startup {service.init} --print` shows the unit")
    return install(service, Path(unit_dir) if unit_dir else None)


def unstartup(init: str | None, *, user: str | None, unit_dir: str | None) -> int:
    service = describe_service(init or detect_init(), user=user)
    return uninstall(service, Path(unit_dir) if unit_dir else None)
