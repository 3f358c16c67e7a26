"""PM2's ecosystem files -> pmx app tables, with a note for every key dropped or changed.

`config.parse_ecosystem` calls `load` for a file that is not TOML and validates the
tables it returns with the same `parse_app` as TOML, so an error still names the file,
the app and the key. `pmx import` writes the same tables as TOML, the notes as comments.

- ecosystem.config.js/.cjs/.mjs: a JS file is a program, run by `node` in a child process
  (cwd = its folder, a timeout) that prints its exports as JSON (functions are lost).
- .json (with comments: read by node, as PM2 does), .yml/.yaml (safe_load), Procfiles.

The mapping is driven by `options.OPTION_BY_NAME` at run time: a PM2 key (or one of
PM2's aliases) whose pmx option exists passes, converted where PM2 means something
else (`exec_mode: "cluster_mode"`, `instances: -1`, `port`); any other key is dropped
with a reason. Nothing is dropped silently: every such key becomes a `Note`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .options import NAME_PATTERN, OPTION_BY_NAME, cpu_count, quote

NODE_TIMEOUT_S = 10.0
_MARK = "@@pmx-ecosystem@@"

# PM2's aliases (its lib/API/schema.json), as the pmx key they fill.
ALIASES: Mapping[str, str] = {
    "exec": "script", "exec_interpreter": "interpreter", "node_args": "interpreter_args",
    "interpreterArgs": "interpreter_args", "out": "out_file", "output": "out_file",
    "out_log": "out_file", "error": "error_file", "err": "error_file", "err_file": "error_file",
    "err_log": "error_file", "combine_logs": "merge_logs", "cron": "cron_restart",
    "uid": "user", "gid": "group", "log": "log_file", "pid": "pid_file",
}
# A key not in options.OPTION_BY_NAME is dropped, with this reason.

DROPPED: Mapping[str, str] = {
    "namespace": "pmx has no namespaces; name the apps, or start some with --only",
    "log_file": "pmx writes no combined stdout+stderr file; out_file and error_file hold "
                "the lines and pmx logs shows both",
    "pid_file": "pmx keeps the pids itself (pmx list --json)",
    "instance_var": "pmx always sets NODE_APP_INSTANCE and PMX_INSTANCE",
    "increment_var": "no pmx equivalent",
    "filter_env": "no pmx equivalent: an app gets the environment of pmx start plus its env",
    "treekill": "pmx always stops the app's whole process group",
    "stop_exit_codes": "no pmx equivalent: autorestart restarts after any exit",
    "autostart": "pmx starts every app of the file; start some with --only",
    "force": "pmx start never runs a second copy of a running app",
    "append_env_to_name": "the name stays the same whatever --env is",
    "watch_options": "chokidar's options; pmx has its own watcher",
    **dict.fromkeys(("username", "name_prefix", "execute_command"), "PM2 fills it in itself"),
    "windowsHide": "Windows only", "log_type": "pmx writes log lines as the app prints them",
    "kill_retry_time": "pmx sends SIGKILL once, after kill_timeout",
    **dict.fromkeys(("vizion", "pmx", "automation", "trace", "disable_trace", "v8", "io",
                     "event_loop_inspector", "deep_monitoring", "post_update", "install_url",
                     "write"), "a PM2/Keymetrics feature with no pmx equivalent"),
    **dict.fromkeys(("source_map_support", "disable_source_map_support"),
                    "Node's --enable-source-maps can go in node_args"),
    # Used only while options.py has no such option.
    **{key: f"this pmx has no {key} option" for key in
       ("watch", "ignore_watch", "watch_delay", "cron_restart")},
}
# PM2 runs these with an interpreter; pmx would execute the file itself.
_EXTENSION_INTERPRETERS = {".sh": "bash", ".bash": "bash", ".rb": "ruby", ".php": "php",
                           ".pl": "perl"}
PM2_DATE_FORMAT = "YYYY-MM-DDTHH:mm:ss"  # what PM2's `time: true` means


@dataclass(frozen=True, slots=True)
class Note:
    """A key of a PM2 file that pmx dropped or changed, and why."""

    app: str | None  # None: the whole file
    key: str
    action: str  # "dropped", "changed" or "added"
    reason: str

    def __str__(self) -> str:
        where = f"app {quote(self.app)}: " if self.app else ""
        return f"{where}{self.key} {self.action}: {self.reason}"


Converted = tuple[list[dict[str, object]], list[Note]]


# ---------------------------------------------------------------- which file is which


def file_kind(path: str | os.PathLike[str]) -> str:
    """"js", "json", "yaml", "procfile" or "toml" (anything else is read as TOML)."""
    name = os.path.basename(os.fspath(path))
    if name.endswith((".js", ".cjs", ".mjs")):
        return "js"
    if name.endswith(".json"):
        return "json"
    if name.endswith((".yml", ".yaml")):
        return "yaml"
    if name == "Procfile" or name.startswith("Procfile."):
        return "procfile"
    return "toml"


def is_ecosystem_name(target: str) -> bool:
    """Whether `pmx start TARGET` means a config file rather than a script: PM2's rule
    (.json, .yml, .yaml, *.config.js/.cjs/.mjs), plus ecosystem*.js, Procfile and .toml."""
    name = os.path.basename(target)
    if name.endswith((".toml", ".json", ".yml", ".yaml")) or file_kind(name) == "procfile":
        return True
    return file_kind(name) == "js" and (
        ".config." in name or name.startswith("ecosystem"))


# ---------------------------------------------------------------- reading


def load(path: Path, source: str) -> Converted:
    """Read a PM2 file or Procfile and convert it. Raises ConfigError naming `source`."""
    kind = file_kind(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read: {exc}") from None
    if kind == "procfile":
        from .procfile import parse_procfile

        return parse_procfile(text, source)
    if kind == "js":
        data = run_node(path, source, "module")
    elif kind == "yaml":
        data = _read_yaml(text, source)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if shutil.which("node") is None:
                raise ConfigError(f"{source}: invalid JSON: {exc}") from None
            data = run_node(path, source, "json")  # PM2 evaluates .json as JavaScript
    return convert(data, source, path.resolve().parent)


def _read_yaml(text: str, source: str) -> object:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{source}: invalid YAML: {problem}{where}") from None


# Runs in node: load the file (require, or import() for ES modules), print its exports
# as JSON after a marker (the file may print things itself), or its error's first line.
_LOADER = r"""
const fs = require('fs'), url = require('url');
const [file, mode, mark] = process.argv.slice(1);
const out = (fd, text) => fs.writeSync(fd, '\n' + mark + text + '\n');
const esm = () => import(url.pathToFileURL(file).href).then(
  (m) => (m.default !== undefined ? m.default : Object.assign({}, m)));
async function load() {
  if (mode === 'json') return require('vm').runInNewContext('(' + fs.readFileSync(file, 'utf8') + ')', {});
  if (file.endsWith('.mjs')) return esm();
  try {
    const conf = require(file);  // a namespace when node's require() loads an ES module
    return conf && conf[Symbol.toStringTag] === 'Module' && conf.default !== undefined ? conf.default : conf;
  } catch (e) { if (e && e.code === 'ERR_REQUIRE_ESM') return esm(); throw e; }
}
load().then((conf) => { out(1, JSON.stringify(conf) ?? 'null'); process.exit(0); }, (e) => {
  let line = String(e && e.message !== undefined ? e.message : e).split('\n')[0];
  if (e && e.name) line = e.name + ': ' + line;
  const first = e && typeof e.stack === 'string' ? e.stack.split('\n')[0] : '';
  if (e instanceof SyntaxError && /:\d+$/.test(first)) line += ' (' + first + ')';
  out(2, line); process.exit(1);
});
"""


def run_node(path: Path, source: str, mode: str) -> object:
    """The JSON of what a JS (or JSON-with-comments) config file exports, by node."""
    import subprocess

    node = shutil.which("node")
    if node is None:
        raise ConfigError(f"{source}: reading a JavaScript config needs node (Node.js) on PATH; "
                          "none found (or write the apps as .json, .yml or TOML)")
    absolute = path.resolve()
    try:
        result = subprocess.run([node, "-e", _LOADER, str(absolute), mode, _MARK],
                                cwd=absolute.parent, capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=NODE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{source}: node did not finish loading it within "
                          f"{NODE_TIMEOUT_S:g}s") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot run node: {exc.strerror or exc}") from None
    if result.returncode != 0:
        message = result.stderr.rpartition(_MARK)[2].strip() if _MARK in result.stderr else \
            next((line for line in result.stderr.splitlines() if line.strip()),
                 f"exit status {result.returncode}")
        message = message.splitlines()[0].replace(str(absolute), os.path.basename(source))
        raise ConfigError(f"{source}: node could not load it: {message}")
    payload = result.stdout.rpartition(_MARK)[2]
    try:
        return json.loads(payload)
    except json.JSONDecodeError:
        raise ConfigError(f"{source}: node printed no configuration") from None


# ---------------------------------------------------------------- converting


def convert(data: object, source: str, base_dir: Path) -> Converted:
    """PM2's `{apps: [...]}`, a bare array of apps, or one app object -> tables, notes."""
    notes: list[Note] = []
    if isinstance(data, list):
        apps: object = data
    elif isinstance(data, dict) and "apps" in data:
        apps = data["apps"]
        notes += [Note(None, key, "dropped", "pmx does not deploy; keep using pm2 deploy or "
                       "your CI for that" if key == "deploy" else "not part of a PM2 app list")
                  for key in data if key != "apps"]
        if isinstance(apps, dict):
            apps = [apps]
    elif isinstance(data, dict) and "script" in data:
        apps = [data]
    else:
        found = "nothing" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{source}: expected {{apps: [...]}} or a list of apps, found {found}")
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"{source}: expected at least one app in apps")
    tables: list[dict[str, object]] = []
    for index, raw in enumerate(apps):
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: apps[{index}] must be an object")
        table, app_notes = convert_app(raw, index, base_dir)
        tables.append(table)
        notes.extend(app_notes)
    if any("stop_signal" not in raw for raw in apps):
        notes.append(Note(None, "stop_signal", "added",
                          '"SIGINT" for each app, the signal PM2 stops apps with '
                          "(pmx's default: SIGTERM)"))
    return tables, notes


def convert_app(raw: Mapping[str, object], index: int,
                base_dir: Path) -> tuple[dict[str, object], list[Note]]:
    """One PM2 app object -> one pmx table and the notes about it."""
    table: dict[str, object] = {}
    changed: list[tuple[str, str, str]] = []  # key, action, reason
    exec_mode: str | None = None
    port: object = None
    given: dict[str, str] = {}  # pmx key -> the PM2 key that gave it
    for pm2_key, value in raw.items():
        if value is None:
            continue  # null is unset, for PM2 as for pmx
        key = ALIASES.get(pm2_key, pm2_key)
        if key in given:
            changed.append((pm2_key, "dropped", f"{given[key]} is given too, and is kept"))
            continue
        given[key] = pm2_key
        if key == "env" or (key.startswith("env_") and len(key) > 4):
            if isinstance(value, dict):
                table[key] = _env(value, key, changed)
            else:
                changed.append((pm2_key, "dropped", "a table of NAME: value is expected"))
        elif key == "exec_mode":
            exec_mode = str(value).removesuffix("_mode") if isinstance(value, str) else None
            if exec_mode is None:
                table[key] = value  # parse_app says what is wrong
        elif key == "instances":
            table[key] = _instances(value, changed)
        elif key == "port":
            port = value
        elif key in ("time", "disable_logs") and value is not True:
            changed.append((pm2_key, "dropped", "false is pmx's default"))
        elif key == "time":  # an explicit log_date_format, before or after, wins
            table.setdefault("log_date_format", PM2_DATE_FORMAT)
            changed.append(("time", "changed", f'log_date_format = "{PM2_DATE_FORMAT}" unless '
                                               "given, what PM2's time: true means"))
        elif key == "disable_logs":
            table.setdefault("out_file", "/dev/null")
            table.setdefault("error_file", "/dev/null")
            changed.append((pm2_key, "changed", 'out_file and error_file = "/dev/null"'))
        elif key in ("user", "group") and isinstance(value, int) and not isinstance(value, bool):
            table[key] = _account_name(key, value, changed)
        elif key == "cron_restart" and value in (0, "0", ""):
            changed.append((pm2_key, "dropped", "0 means no cron restart"))
        elif key in OPTION_BY_NAME:
            table[key] = value
        else:
            changed.append((pm2_key, "dropped", DROPPED.get(key, "not a PM2 or pmx option")))
    if port is not None:
        _port(table, port, changed)
    _name_and_script(table, base_dir, changed)
    _exec_mode(table, exec_mode, "instances" in raw, changed)
    table.setdefault("stop_signal", "SIGINT")
    name = table.get("name")
    app = name if isinstance(name, str) else f"apps[{index}]"
    return table, [Note(app, key, action, reason) for key, action, reason in changed]


def _env(value: Mapping[object, object], key: str,
         changed: list[tuple[str, str, str]]) -> dict[str, object]:
    env: dict[str, object] = {}
    for name, item in value.items():
        if item is None:
            changed.append((f"{key}.{name}", "dropped", "null is no value"))
        elif isinstance(item, dict | list):
            env[str(name)] = json.dumps(item, separators=(",", ":"))
            changed.append((f"{key}.{name}", "changed", "written as its JSON text"))
        else:
            env[str(name)] = item
    return env


def _instances(value: object, changed: list[tuple[str, str, str]]) -> object:
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if value == 0 or value == "max":
        if value == 0:
            changed.append(("instances", "changed", '0 means "max" (all CPUs) in PM2'))
        return "max"
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        count = max(1, cpu_count() + value)
        changed.append(("instances", "changed",
                        f"{value} means all CPUs but {-value}: {count} on this machine"))
        return count
    return value


def _port(table: dict[str, object], value: object, changed: list[tuple[str, str, str]]) -> None:
    """PM2's `port` only sets PORT for the app; pmx's `port` would bind 0.0.0.0."""
    env = table.setdefault("env", {})
    if isinstance(env, dict) and "PORT" not in env:
        env["PORT"] = str(value)
    changed.append(("port", "changed", f"env.PORT = {quote(str(value))} (PM2's port only sets "
                                       "PORT; pmx's port means a cluster socket)"))


def _account_name(key: str, value: int, changed: list[tuple[str, str, str]]) -> object:
    import grp
    import pwd

    try:
        name = pwd.getpwuid(value).pw_name if key == "user" else grp.getgrgid(value).gr_name
    except KeyError:
        return str(value)
    changed.append((key, "changed", f"id {value} written as its name {quote(name)}"))
    return name


def _name_and_script(table: dict[str, object], base_dir: Path,
                     changed: list[tuple[str, str, str]]) -> None:
    from .config import default_interpreter

    script = table.get("script")
    if not isinstance(script, str) or not script.strip():
        return  # parse_app says what is missing
    cwd = table.get("cwd")
    folder = base_dir / cwd if isinstance(cwd, str) else base_dir
    if " " in script.strip() and not (folder / script).exists():
        # PM2 runs a script with spaces that is no file through the shell.
        args = table.pop("args", None)
        extra = shlex.join(map(str, args)) if isinstance(args, list) else str(args or "")
        command = f"{script} {extra}".strip()
        table.update(script="sh", interpreter="none", args=["-c", command])
        changed.append(("script", "changed", f'run through the shell: sh -c {quote(command)}'))
        table.setdefault("name", script.split()[0].rsplit("/", 1)[-1])
    extension = os.path.splitext(script)[1]
    if "interpreter" not in table and default_interpreter(script) == "none":
        if extension in _EXTENSION_INTERPRETERS:
            table["interpreter"] = _EXTENSION_INTERPRETERS[extension]
        elif _is_node_program(folder / script):
            table["interpreter"] = "node"  # PM2's default: ./bin/www, a package folder
    name = table.get("name")
    if name is None:
        base = os.path.basename(script.rstrip("/"))
        table["name"] = pmx_name(os.path.splitext(base)[0] or base)
    elif isinstance(name, str) and not NAME_PATTERN.fullmatch(name) and name.strip():
        fixed = pmx_name(name)
        if fixed != name and NAME_PATTERN.fullmatch(fixed):
            table["name"] = fixed
            changed.append(("name", "changed", f'{quote(name)} -> {quote(fixed)}: pmx names are '
                                               'letters, digits and "_.@-"'))


def _is_node_program(path: Path) -> bool:
    """A folder (node runs its index.js) or a file with no extension that is neither a
    binary nor a script for another interpreter (#!)."""
    if path.is_dir():
        return True
    try:
        with path.open("rb") as file:
            head = file.read(256)
    except OSError:
        return False  # a command found on PATH, or nothing: pmx says so at start
    if head.startswith(b"#!"):
        return b"node" in head.split(b"\n", 1)[0]
    return not head.startswith(b"\x7fELF") and b"\0" not in head


def pmx_name(name: str) -> str:
    """A name pmx accepts: other characters become "-"."""
    return re.sub(r"[^A-Za-z0-9_.@-]+", "-", name).strip("-_.@")[:64] or "app"


def _runtime(table: Mapping[str, object]) -> str | None:
    """"node" or "python" when pmx's drop-in cluster preloads fit the app."""
    from .config import default_interpreter

    script = table.get("script")
    if not isinstance(script, str):
        return None
    interpreter = table.get("interpreter")
    program = interpreter if isinstance(interpreter, str) and interpreter else \
        default_interpreter(script)
    if program == "none":
        program = script
    base = os.path.basename(program)
    if base in ("node", "nodejs") or (base.startswith("node") and base[4:].isdigit()):
        return "node"
    return "python" if base.startswith(("python", "pypy")) else None


def _exec_mode(table: dict[str, object], exec_mode: str | None, has_instances: bool,
               changed: list[tuple[str, str, str]]) -> None:
    """PM2's cluster mode -> pmx's, which shares the app's own port through the
    preloads (Node, Python) or a declared `listen`. PM2 also defaults to cluster mode
    for a Node app with `instances`."""
    runtime = _runtime(table)
    if exec_mode is None and has_instances and runtime == "node":
        exec_mode = "cluster"
    if exec_mode == "cluster" and runtime is None and "listen" not in table:
        changed.append(("exec_mode", "changed",
                        '"fork": pmx shares a port for Node and Python apps, or for any app '
                        "with listen; this one runs its instances as plain forks"))
        exec_mode = "fork"
    if exec_mode is not None and exec_mode != "fork":
        table["exec_mode"] = exec_mode
