"""PM2 ecosystem files and Procfiles: read, converted to pmx apps, every dropped key noted.

The corpus is tests/configs/pm2/: real-world-shaped files (a cluster web app with
env_production, a bare array in .cjs, several apps in .json, .yml, an ES module, a .json
with comments, a Procfile, and one with deploy, watch, cron and unknown keys).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pmx.cli.import_command import convert_file
from pmx.supervisor import pm2
from pmx.supervisor.config import AppSpec, parse_ecosystem
from pmx.supervisor.errors import ConfigError
from pmx.supervisor.options import OPTION_BY_NAME, cpu_count

CORPUS = Path(__file__).resolve().parent.parent / "configs" / "pm2"
FILES = sorted(path for path in CORPUS.iterdir() if path.is_file())
PM2_FILES = [path for path in FILES if pm2.file_kind(path) != "procfile"]
CLI = [sys.executable, "-m", "pmx.cli.main"]


def load(path: Path, env_name: str | None = None) -> tuple[dict[str, AppSpec], list[pm2.Note]]:
    notes: list[pm2.Note] = []
    specs = parse_ecosystem(path, env_name=env_name, notes=notes)
    return {spec.name: spec for spec in specs}, notes


def raw_apps(path: Path) -> list[dict[str, object]]:
    """The apps as PM2 sees them, before any conversion."""
    kind = pm2.file_kind(path)
    if kind == "js":
        data = pm2.run_node(path, path.name, "module")
    elif kind == "yaml":
        import yaml

        data = yaml.safe_load(path.read_text())
    else:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = pm2.run_node(path, path.name, "json")
    apps = data["apps"] if isinstance(data, dict) else data
    assert isinstance(apps, list)
    return apps


def noted(notes: list[pm2.Note], key: str, app: str | None = None) -> list[pm2.Note]:
    return [note for note in notes if note.key == key and (app is None or note.app == app)]


def test_corpus_has_every_kind_of_file() -> None:
    kinds = {pm2.file_kind(path) for path in FILES}
    assert kinds == {"js", "json", "yaml", "procfile"}
    assert len(FILES) >= 6
    assert {path.suffix for path in FILES} >= {".js", ".cjs", ".mjs", ".json", ".yml"}


@pytest.mark.parametrize("path", FILES, ids=[path.name for path in FILES])
def test_corpus_file_parses_and_imports_to_the_same_apps(path: Path, tmp_path: Path) -> None:
    """pmx import's TOML, written elsewhere, starts exactly what the PM2 file starts."""
    specs, _ = load(path)
    out = tmp_path / "out" / "ecosystem.toml"
    out.parent.mkdir()
    text, notes, count = convert_file(str(path), str(out))
    out.write_text(text)
    again = {spec.name: spec for spec in parse_ecosystem(out)}
    assert again == specs
    assert count == len(specs)
    profiles = {key for table in tomllib.loads(text)["apps"] for key in table
                if key.startswith("env_")}
    for profile in profiles:
        assert {s.name: s for s in parse_ecosystem(out, env_name=profile[4:])} == \
            load(path, profile[4:])[0]
    for note in notes:  # every note is a comment in the TOML
        assert f"# {note.key} {note.action}:" in text


@pytest.mark.parametrize("path", PM2_FILES, ids=[path.name for path in PM2_FILES])
def test_every_key_is_mapped_or_reported(path: Path) -> None:
    """No key of a PM2 app disappears silently: it is in the pmx table, or a note says
    what happened to it."""
    tables, notes = pm2.load(path, path.name)
    for raw, table in zip(raw_apps(path), tables, strict=True):
        for key, value in raw.items():
            target = pm2.ALIASES.get(key, key)
            if value is None or (key == "exec_mode" and str(value).startswith("fork")):
                continue  # unset, or pmx's default
            assert target in table or noted(notes, key, str(table["name"])), (path.name, key)


def test_express_cluster_with_env_production() -> None:
    specs, notes = load(CORPUS / "ecosystem.config.js", "production")
    web, queue = specs["web"], specs["queue"]
    assert (web.exec_mode, web.instances) == ("cluster", cpu_count())
    assert web.env["NODE_ENV"] == "production" and web.env["API_URL"] == "https://api.example.com"
    assert web.env["PORT"] == "3000"  # from env, kept under --env production
    assert web.interpreter_args == ("--max-old-space-size=256",)
    assert web.max_memory_restart_bytes == 300 * 1024**2
    assert (web.kill_timeout_s, web.listen_timeout_s) == (3.0, 8.0)  # PM2's milliseconds
    assert web.merge_logs and web.log_date_format == "YYYY-MM-DD HH:mm:ss Z"
    assert web.stop_signal == "SIGINT"  # as PM2 stops apps
    assert queue.command()[0] == "python3" and queue.args == ("--queue", "default")
    assert (queue.min_uptime_s, queue.restart_delay_s, queue.max_restarts) == (5.0, 1.0, 10)
    assert queue.exec_mode == "fork" and queue.instances == 1
    assert queue.env["QUEUE_CONCURRENCY"] == "2"  # computed by the JS file itself
    assert [str(note) for note in notes] == [
        'stop_signal added: "SIGINT" for each app, the signal PM2 stops apps with '
        "(pmx's default: SIGTERM)"]


def test_bare_array_in_cjs_with_pm2_only_keys() -> None:
    specs, notes = load(CORPUS / "api.config.cjs")
    api = specs["node_hello"]  # no name: the script's name, as PM2 does
    assert api.exec_mode == "cluster" and api.instances == max(1, cpu_count() - 1)
    assert api.env == {"NODE_ENV": "production", "PORT": "18751"}
    assert api.listen == ()  # PM2's port is only PORT, not a socket pmx binds
    assert api.log_date_format == "YYYY-MM-DDTHH:mm:ss"  # time: true
    assert api.exp_backoff_restart_delay_s == 0.1 and api.shutdown_with_message
    assert api.out_file == str(CORPUS / "logs" / "api-out.log")
    assert noted(notes, "log_file", "node_hello")[0].action == "dropped"
    assert noted(notes, "port", "node_hello")[0].action == "changed"
    assert "all CPUs but 1" in noted(notes, "instances", "node_hello")[0].reason
    assert specs["scheduler"].autorestart is False


def test_json_with_several_apps() -> None:
    specs, notes = load(CORPUS / "services.json")
    assert list(specs) == ["static", "sleeper", "report"]
    assert specs["static"].exec_mode == "fork" and specs["static"].env == {
        "PORT": "18761", "DEBUG": "false"}
    sleeper = specs["sleeper"]
    # cluster for a program pmx cannot share a port for, without listen: plain forks
    assert sleeper.exec_mode == "fork" and sleeper.instances == cpu_count()
    assert sleeper.command() == ["/bin/sleep", "3600"]
    assert noted(notes, "exec_mode", "sleeper")[0].action == "changed"
    assert specs["report"].command()[:2] == ["python3", "-u"]
    assert specs["report"].min_uptime_s == 2.0
    dropped = {(note.app, note.key) for note in notes if note.action == "dropped"}
    assert dropped == {("static", "namespace"), ("static", "vizion"), ("sleeper", "treekill"),
                       ("sleeper", "instance_var"), ("report", "stop_exit_codes")}


def test_yaml_with_watch_keys() -> None:
    specs, notes = load(CORPUS / "process.yml", "production")
    assert specs["api"].exec_mode == "cluster" and specs["api"].instances == 2
    assert specs["api"].env == {"NODE_ENV": "production"}
    assert specs["worker"].min_uptime_s == 10.0
    for key in ("watch", "ignore_watch", "watch_delay"):
        # mapped once options.py has the option, reported as dropped until then
        assert (key in OPTION_BY_NAME) != bool(noted(notes, key, "worker"))


def test_kitchen_sink_reports_everything_dropped() -> None:
    specs, notes = load(CORPUS / "kitchen-sink.config.js")
    assert set(specs) == {"Main-API", "npm"}
    main = specs["Main-API"]
    assert main.env == {"NODE_ENV": "production", "FEATURES": '{"beta":true}'}
    assert main.merge_logs and main.out_file == str(CORPUS / "main-out.log")
    assert main.interpreter == "node" and main.interpreter_args == ("--enable-source-maps",)
    dropped = {note.key for note in notes if note.action == "dropped" and note.app == "Main-API"}
    assert dropped >= {"instnaces", "namespace", "pmx", "automation", "source_map_support",
                       "increment_var", "filter_env", "io", "watch_options", "env.EMPTY"}
    assert noted(notes, "instnaces")[0].reason == "not a PM2 or pmx option"
    assert noted(notes, "name", "Main-API")[0].action == "changed"
    assert noted(notes, "deploy")[0].app is None
    for key in ("watch", "ignore_watch", "watch_delay", "cron_restart"):
        assert (key in OPTION_BY_NAME) != bool(noted(notes, key, "Main-API"))
    npm = specs["npm"]  # a script with spaces runs through the shell, as in PM2
    assert npm.command() == ["sh", "-c", "npm run start --silent"]
    assert npm.out_file == npm.error_file == "/dev/null"  # disable_logs
    assert {note.key for note in notes if note.app == "npm" and note.action == "dropped"} == {
        "autostart", "cron_restart"}
    assert not any("not-a-real-key" in str(note) for note in notes)  # values are not echoed


def test_esm_module_and_implicit_cluster() -> None:
    specs, _ = load(CORPUS / "esm.config.mjs")
    # PM2 runs a Node app with `instances` and no exec_mode in cluster mode
    assert specs["esm-web"].exec_mode == "cluster" and specs["esm-web"].instances == 2
    assert specs["esm-worker"].exec_mode == "fork" and specs["esm-worker"].max_restarts == 5


def test_json_with_comments_is_read_by_node_as_pm2_does() -> None:
    specs, _ = load(CORPUS / "commented.json")
    assert specs["legacy"].interpreter == "python3"


def test_procfile() -> None:
    specs, notes = load(CORPUS / "Procfile")
    assert list(specs) == ["web", "worker", "clock", "release"]
    assert specs["web"].command() == ["node", "../../apps/node_hello.js"]
    assert specs["worker"].command() == ["python3", "../../apps/idle.py", "--queue", "default"]
    # shell syntax: sh -c; a single command gets exec so the stop signal reaches it
    assert specs["clock"].command() == [
        "sh", "-c", "sh -c 'echo tick' && exec python3 ../../apps/idle.py"]
    assert specs["release"].command() == ["sh", "-c", 'exec echo "migrating on $PORT" > /dev/null']
    assert [spec.env["PORT"] for spec in specs.values()] == ["5000", "5100", "5200", "5300"]
    assert all(spec.stop_signal == "SIGTERM" for spec in specs.values())  # foreman's signal
    assert [note.key for note in notes] == ["env.PORT"]


# ---------------------------------------------------------------- errors, one line each


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_ecosystem(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_js_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "ecosystem.config.js", "module.exports = {\n  apps: [\n")
    assert error_of(path) == (f"{path}: node could not load it: SyntaxError: Unexpected end "
                              "of input (ecosystem.config.js:3)")


def test_js_that_throws_gives_the_first_line(tmp_path: Path) -> None:
    path = write(tmp_path, "ecosystem.config.js", 'throw new Error("no DB_URL\\nmore")\n')
    assert error_of(path) == f"{path}: node could not load it: Error: no DB_URL"
    path = write(tmp_path, "b.config.js", 'require("no-such-module-pmx")\n')
    assert error_of(path) == (f"{path}: node could not load it: Error: Cannot find module "
                              "'no-such-module-pmx'")


def test_js_without_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "ecosystem.config.js", "module.exports = {apps: []}\n")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert error_of(path).startswith(f"{path}: reading a JavaScript config needs node (Node.js)")


def test_js_that_never_ends_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pm2, "NODE_TIMEOUT_S", 0.5)
    path = write(tmp_path, "ecosystem.config.js", "while (true) {}\n")
    assert error_of(path) == f"{path}: node did not finish loading it within 0.5s"


def test_js_that_prints_and_runs_in_its_folder(tmp_path: Path) -> None:
    (tmp_path / "app.js").write_text("")
    path = write(tmp_path, "ecosystem.config.js",
                 'console.log("loading {\\"apps\\": 1}"); process.stdout.write("x");\n'
                 'const fs = require("fs");\n'
                 'module.exports = {apps: [{name: process.cwd() === __dirname ? "here" : "not",'
                 ' script: "app.js", handler() {}}]};\n')
    assert [spec.name for spec in parse_ecosystem(path)] == ["here"]


def test_es_module_js_in_a_type_module_package(tmp_path: Path) -> None:
    (tmp_path / "package.json").write_text('{"type": "module"}')
    path = write(tmp_path, "ecosystem.config.js",
                 'export default {apps: [{name: "m", script: "app.js"}]};\n')
    assert [spec.name for spec in parse_ecosystem(path)] == ["m"]


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("a.config.js", "module.exports = () => ({apps: []})\n",
     "expected {apps: [...]} or a list of apps, found nothing"),
    ("b.json", '{"apps": []}', "expected at least one app in apps"),
    ("c.json", '{"apps": ["api"]}', "apps[0] must be an object"),
    ("d.yml", "apps:\n  - name: a\n   script: x\n", "invalid YAML: "),
    ("e.json", '{"apps": [{"name": "api", "script": "a.js", "kill_timeout": "soon"}]}',
     'app "api" (apps[0]): kill_timeout must be a duration like 1600 (ms) or "5s", got "soon"'),
    ("f.json", '{"apps": [{"name": "api"}]}', 'app "api" (apps[0]): missing key "script"'),
    ("Procfile", "web: node a.js\nthis is not a process\n",
     'line 2: expected "name: command", got "this is not a process"'),
    ("Procfile.dev", "# nothing\n\n", 'no "name: command" line'),
])
def test_invalid_files(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = write(tmp_path, name, text)
    assert error_of(path).startswith(f"{path}: {expected}")


def test_missing_file(tmp_path: Path) -> None:
    assert error_of(tmp_path / "ecosystem.config.js") == f"{tmp_path}/ecosystem.config.js: no such file"


@pytest.mark.parametrize(("target", "is_config"), [
    ("ecosystem.config.js", True), ("deploy/app.config.cjs", True), ("pm2.config.mjs", True),
    ("ecosystem.js", True), ("process.json", True), ("process.yml", True), ("apps.yaml", True),
    ("Procfile", True), ("Procfile.dev", True), ("ecosystem.toml", True),
    ("app.js", False), ("server.mjs", False), ("main.py", False), ("bin/server", False),
])
def test_which_names_are_config_files(target: str, is_config: bool) -> None:
    assert pm2.is_ecosystem_name(target) is is_config


# ---------------------------------------------------------------- pmx import


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_pmx_import_to_stdout_and_to_a_file(tmp_path: Path) -> None:
    source = CORPUS / "kitchen-sink.config.js"
    shown = run_cli("import", str(source))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("# pmx ecosystem file, converted from kitchen-sink.config.js")
    assert "# instnaces dropped: not a PM2 or pmx option\n" in shown.stdout
    out = tmp_path / "ecosystem.toml"
    written = run_cli("import", str(source), "-o", str(out))
    assert written.returncode == 0, written.stderr
    assert written.stdout == ""
    assert written.stderr.startswith(f"[pmx] wrote {out}: 2 apps from {source}; ")
    assert "[pmx]   app \"Main-API\": instnaces dropped: not a PM2 or pmx option" in written.stderr
    cwd = tomllib.loads(out.read_text())["apps"][0]["cwd"]
    assert not Path(cwd).is_absolute() and (out.parent / cwd).resolve() == CORPUS
    assert parse_ecosystem(out) == parse_ecosystem(source)


def test_pmx_import_refuses_to_overwrite_and_refuses_toml(tmp_path: Path) -> None:
    out = tmp_path / "ecosystem.toml"
    out.write_text("# mine\n")
    refused = run_cli("import", str(CORPUS / "Procfile"), "-o", str(out))
    assert refused.returncode == 2
    assert refused.stderr == f"pmx: {out} exists; pmx import ... --force replaces it\n"
    assert out.read_text() == "# mine\n"
    forced = run_cli("import", str(CORPUS / "Procfile"), "-o", str(out), "--force")
    assert forced.returncode == 0 and "[[apps]]" in out.read_text()
    again = run_cli("import", str(out))
    assert again.returncode == 2
    assert again.stderr == f"pmx: {out}: already an ecosystem TOML; pmx start it as it is\n"


def test_pmx_import_of_a_broken_file_is_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, "ecosystem.config.js", "module.exports = {apps: [{script: 1}]}\n")
    result = run_cli("import", str(path))
    assert result.returncode == 2
    assert result.stderr == (f"pmx: {path}: apps[0]: script must be a non-empty string, "
                             "got 1\n")


# ---------------------------------------------------------------- PM2's semantics, one by one


def convert_one(tmp_path: Path, app: dict[str, object]) -> tuple[dict[str, object], list[str]]:
    tables, notes = pm2.convert({"apps": [app]}, "eco.json", tmp_path)
    return tables[0], [str(note) for note in notes if note.app is not None]


def test_interpreters_pm2_would_pick(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "www").write_text("#!/usr/bin/env node\nrequire('../app');\n")
    (tmp_path / "worker").mkdir()  # a package folder: node runs its index.js
    (tmp_path / "server").write_bytes(b"\x7fELF\x02\x01\x01\0")
    assert convert_one(tmp_path, {"script": "./bin/www"})[0]["interpreter"] == "node"
    assert convert_one(tmp_path, {"script": "./worker/"})[0] == {
        "name": "worker", "script": "./worker/", "interpreter": "node", "stop_signal": "SIGINT"}
    assert "interpreter" not in convert_one(tmp_path, {"script": "./server"})[0]  # a binary
    assert convert_one(tmp_path, {"script": "deploy.sh"})[0]["interpreter"] == "bash"
    assert "interpreter" not in convert_one(tmp_path, {"script": "app.py"})[0]  # pmx's Python
    assert "interpreter" not in convert_one(tmp_path, {"script": "gunicorn"})[0]  # on PATH


def test_aliases_and_keys_given_twice(tmp_path: Path) -> None:
    table, notes = convert_one(tmp_path, {
        "exec": "a.js", "name": "a", "out": "o.log", "out_file": "p.log", "err_log": "e.log",
        "node_args": "--inspect", "combine_logs": True, "uid": 0})
    assert table["script"] == "a.js" and table["out_file"] == "o.log"
    assert table["error_file"] == "e.log" and table["interpreter_args"] == "--inspect"
    assert table["merge_logs"] is True and table["user"] == "root"
    assert 'app "a": out_file dropped: out is given too, and is kept' in notes
    assert 'app "a": user changed: id 0 written as its name "root"' in notes


def test_port_time_and_nulls(tmp_path: Path) -> None:
    table, notes = convert_one(tmp_path, {
        "name": "a", "script": "a.js", "port": 8080, "env": {"A": 1}, "time": True,
        "log_date_format": "HH:mm", "cwd": None, "env_staging": {"A": 2, "B": None}})
    assert table["env"] == {"A": 1, "PORT": "8080"}  # PM2's port: PORT for the app
    assert "port" not in table and "listen" not in table
    assert table["log_date_format"] == "HH:mm"  # given: time: true does not replace it
    assert "cwd" not in table and table["env_staging"] == {"A": 2}
    assert 'app "a": env_staging.B dropped: null is no value' in notes


def test_exec_modes(tmp_path: Path) -> None:
    def mode(**app: object) -> object:
        return convert_one(tmp_path, {"name": "a", **app})[0].get("exec_mode", "fork")

    assert mode(script="a.js", exec_mode="cluster_mode") == "cluster"
    assert mode(script="a.js", exec_mode="fork_mode", instances=4) == "fork"
    assert mode(script="a.js", instances=1) == "cluster"  # PM2's default for Node
    assert mode(script="a.py", instances=2) == "fork"  # ... and for Node only
    assert mode(script="a.py", exec_mode="cluster") == "cluster"  # pmx's Python drop-in
    assert mode(script="./srv", interpreter="none", exec_mode="cluster",
                listen="127.0.0.1:8000") == "cluster"
    assert mode(script="./srv", interpreter="none", exec_mode="cluster") == "fork"


def test_names_pmx_cannot_take_are_changed(tmp_path: Path) -> None:
    table, notes = convert_one(tmp_path, {"name": "api/v2 (eu)", "script": "a.js"})
    assert table["name"] == "api-v2-eu"
    assert notes == ['app "api-v2-eu": name changed: "api/v2 (eu)" -> "api-v2-eu": pmx names '
                     'are letters, digits and "_.@-"']
