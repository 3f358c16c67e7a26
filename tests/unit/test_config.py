"""Pure config logic: value parsers, defaults, paths, env overlays, --only, the table round trip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import tomli_w
from pmx.supervisor.config import MASK, AppSpec, mask_env, parse_app, parse_ecosystem, spec_from_table
from pmx.supervisor.errors import ConfigError
from pmx.supervisor.options import OPTIONS, cpu_count, parse_duration_s, parse_size_bytes

BASE: dict[str, object] = {"name": "api", "script": "api.py"}


def app_in(base_dir: Path, options: dict[str, object], env_name: str | None = None) -> AppSpec:
    return parse_app({**BASE, **options}, source="t.toml", index=0, base_dir=base_dir,
                     env_name=env_name)


def app(**options: object) -> AppSpec:
    """An app named "api" in /srv with these options."""
    return app_in(Path("/srv"), options)


def rejected(key: str, value: object) -> str:
    """The one-line error for `key = value`, checked to name the app and the key."""
    with pytest.raises(ConfigError) as caught:
        app(**{key: value})
    message = str(caught.value)
    assert message.startswith(f't.toml: app "api" (apps[0]): {key} must be '), message
    assert "\n" not in message
    return message


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (1600, 1.6),
        (0, 0.0),
        (250.5, 0.2505),
        ("1600", 1.6),
        ("500ms", 0.5),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (" 3 s ", 3.0),
    ],
)
def test_duration_is_parsed_to_seconds(value: object, seconds: float) -> None:
    assert parse_duration_s(value) == pytest.approx(seconds)
    assert app(kill_timeout=value).kill_timeout_s == pytest.approx(seconds)


@pytest.mark.parametrize("value", [-1, -0.5, "-5s", True, False, "soon", "", "5 sec", "5d", [5], None])
def test_bad_duration_is_rejected(value: object) -> None:
    message = rejected("kill_timeout", value)
    assert "duration" in message


def test_bad_duration_message_shows_what_was_found() -> None:
    assert rejected("kill_timeout", "soon") == (
        't.toml: app "api" (apps[0]): kill_timeout must be a duration like 1600 (ms) or "5s", got "soon"'
    )


@pytest.mark.parametrize(
    ("option", "field"),
    [(o.name, o.field) for o in OPTIONS if o.field.endswith("_s")],
)
def test_every_duration_option_uses_the_duration_parser(option: str, field: str) -> None:
    assert getattr(app(**{option: "2s"}), field) == 2.0
    rejected(option, "soon")


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("300M", 300 * 1024**2),
        ("1G", 1024**3),
        ("512K", 512 * 1024),
        ("512k", 512 * 1024),
        ("2MB", 2 * 1024**2),
        ("2MiB", 2 * 1024**2),
        ("1.5G", 3 * 1024**3 // 2),
        ("1T", 1024**4),
        (1024, 1024),
        ("1024", 1024),
    ],
)
def test_size_is_parsed_to_bytes(value: object, size: int) -> None:
    assert parse_size_bytes(value) == size
    assert app(max_memory_restart=value).max_memory_restart_bytes == size


@pytest.mark.parametrize("value", [0, "0", "0M", -1, "-1", "lots", "300X", True, 1.5, "", [1]])
def test_bad_size_is_rejected(value: object) -> None:
    message = rejected("max_memory_restart", value)
    assert 'a size like 314572800 (bytes) or "300M"' in message


def test_max_log_size_uses_the_size_parser() -> None:
    assert app(max_log_size="10M").max_log_size_bytes == 10 * 1024**2
    rejected("max_log_size", "big")


# ---------------------------------------------------------------- other values


def test_instances_max_is_the_cpu_count() -> None:
    assert app(instances="max").instances == cpu_count()
    assert cpu_count() >= 1


@pytest.mark.parametrize("value", [0, -1, 1025, "four", "MAX", True, 2.0])
def test_bad_instances_are_rejected(value: object) -> None:
    rejected("instances", value)


def test_instances_bounds_are_accepted() -> None:
    assert app(instances=1).instances == 1
    assert app(instances=1024).instances == 1024


def test_args_string_is_split_like_a_shell() -> None:
    spec = app(args="--port 8000 --name 'a b' \"c d\"")
    assert spec.args == ("--port", "8000", "--name", "a b", "c d")


def test_args_list_is_kept_and_numbers_become_strings() -> None:
    assert app(args=["--port", 8000, "a b"]).args == ("--port", "8000", "a b")
    assert app(args=[]).args == ()


@pytest.mark.parametrize("value", [5, "'unbalanced", [["nested"]], {"a": 1}])
def test_bad_args_are_rejected(value: object) -> None:
    rejected("args", value)


def test_interpreter_args_go_between_interpreter_and_script() -> None:
    spec = app(script="/srv/api.py", interpreter_args="-X dev", args=["serve"])
    assert spec.command() == [sys.executable, "-X", "dev", "/srv/api.py", "serve"]


@pytest.mark.parametrize(
    ("script", "interpreter"),
    [("/srv/app.py", sys.executable), ("/srv/app.js", "node"), ("/srv/app.mjs", "node"),
     ("/srv/app.cjs", "node")],
)
def test_interpreter_default_by_extension(script: str, interpreter: str) -> None:
    assert app(script=script, args=["x"]).command() == [interpreter, script, "x"]


@pytest.mark.parametrize("script", ["/srv/app.sh", "/srv/app", "gunicorn"])
def test_other_scripts_run_directly(script: str) -> None:
    spec = app(script=script, args=["x"])
    assert spec.interpreter is None
    assert spec.command() == [script, "x"]


def test_explicit_interpreter_wins_over_the_extension() -> None:
    assert app(script="/srv/app.py", interpreter="none").command() == ["/srv/app.py"]
    assert app(script="/srv/app.js", interpreter="bun").command() == ["bun", "/srv/app.js"]


@pytest.mark.parametrize("value", ["SIGINT", "sigint", "INT", "hup", "SIGUSR1"])
def test_stop_signal_is_normalised(value: str) -> None:
    assert app(stop_signal=value).stop_signal == "SIG" + value.upper().removeprefix("SIG")


@pytest.mark.parametrize("value", ["SIGKILL", "KILL", "SIGSTOP", "SIGNOPE", "", 15])
def test_bad_stop_signal_is_rejected(value: object) -> None:
    rejected("stop_signal", value)


@pytest.mark.parametrize("name", ["api", "api-v2", "a_b.c@d", "x" * 64, "0api", "455"])
def test_good_names_are_accepted(name: str) -> None:
    assert app(name=name).name == name


@pytest.mark.parametrize("name", ["all", "a b", "x" * 65, "-api", ".api", "api/v2", "é"])
def test_bad_names_are_rejected(name: str) -> None:
    with pytest.raises(ConfigError, match=r"name must be letters, digits"):
        app(name=name)


def test_missing_name_is_named_by_index() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_app({"script": "x.py"}, source="t.toml", index=3, base_dir=Path("/"))
    assert str(caught.value) == 't.toml: apps[3]: missing key "name" (a non-empty string)'


def test_unknown_key_suggests_the_closest_option() -> None:
    with pytest.raises(ConfigError) as caught:
        app(kill_timout=5)
    assert str(caught.value) == (
        't.toml: app "api" (apps[0]): unknown key "kill_timout"; did you mean "kill_timeout"?'
    )


# ---------------------------------------------------------------- listen and port


def test_port_is_shorthand_for_listen_on_all_addresses() -> None:
    spec = app(exec_mode="cluster", port=8000)
    assert spec.listen == ("0.0.0.0:8000",)
    assert spec.port is None
    assert spec.is_cluster


@pytest.mark.parametrize(
    "address", ["127.0.0.1:8000", "0.0.0.0:1", "[::1]:8000", "[::]:65535", "localhost:80", "unix:/tmp/a.sock"]
)
def test_good_listen_addresses_are_accepted(address: str) -> None:
    assert app(exec_mode="cluster", listen=address).listen == (address,)


def test_listen_accepts_a_list() -> None:
    spec = app(exec_mode="cluster", listen=["127.0.0.1:8000", "unix:/tmp/a.sock"])
    assert spec.listen == ("127.0.0.1:8000", "unix:/tmp/a.sock")


@pytest.mark.parametrize(
    "address",
    ["localhost", ":8000", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:http", "[::1:8000", "unix:",
     "unix:/" + "x" * 107],
)
def test_bad_listen_addresses_are_rejected(address: str) -> None:
    with pytest.raises(ConfigError, match=r"listen must be "):
        app(exec_mode="cluster", listen=address)


@pytest.mark.parametrize("value", [0, 65536, "8000", True])
def test_bad_port_is_rejected(value: object) -> None:
    with pytest.raises(ConfigError, match=r"port must be a port number from 1 to 65535"):
        app(exec_mode="cluster", port=value)


# ---------------------------------------------------------------- paths


def test_cwd_is_relative_to_the_file_folder(tmp_path: Path) -> None:
    folder = tmp_path.resolve() / "project"
    path = write(folder / "ecosystem.toml", """
[[apps]]
name = "default"
script = "./server.py"
out_file = "logs/out.log"

[[apps]]
name = "relative"
script = "./server.py"
cwd = "work"
error_file = "err.log"

[[apps]]
name = "absolute"
script = "server.py"
cwd = "/opt/app"
""")
    default, relative, absolute = parse_ecosystem(path)
    assert default.cwd == str(folder)
    assert default.script == str(folder / "server.py")
    assert default.out_file == str(folder / "logs" / "out.log")
    assert relative.cwd == str(folder / "work")
    assert relative.script == str(folder / "work" / "server.py")
    assert relative.error_file == str(folder / "work" / "err.log")
    assert absolute.cwd == "/opt/app"


def test_cwd_does_not_depend_on_the_process_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path.resolve() / "project"
    write(folder / "ecosystem.toml", '[[apps]]\nname = "a"\nscript = "a.py"\ncwd = "sub"\n')
    monkeypatch.chdir(tmp_path)
    (spec,) = parse_ecosystem("project/ecosystem.toml")
    assert spec.cwd == str(folder / "sub")


def test_bare_command_is_left_for_path_lookup_unless_it_exists_in_cwd(tmp_path: Path) -> None:
    folder = tmp_path.resolve()
    assert app_in(folder, {"script": "gunicorn"}).script == "gunicorn"
    (folder / "local.py").write_text("")
    assert app_in(folder, {"script": "local.py"}).script == str(folder / "local.py")


# ---------------------------------------------------------------- env overlays


ENV_FILE = """
[[apps]]
name = "api"
script = "api.py"
env = { A = "1", B = "2", FLAG = true, N = 3 }
env_production = { B = "prod", C = "3" }
"""


def test_env_values_become_strings(tmp_path: Path) -> None:
    (spec,) = parse_ecosystem(write(tmp_path / "e.toml", ENV_FILE))
    assert spec.env == {"A": "1", "B": "2", "FLAG": "true", "N": "3"}


def test_env_overlay_is_merged_only_when_selected(tmp_path: Path) -> None:
    path = write(tmp_path / "e.toml", ENV_FILE)
    (plain,) = parse_ecosystem(path)
    (production,) = parse_ecosystem(path, env_name="production")
    assert plain.env == {"A": "1", "B": "2", "FLAG": "true", "N": "3"}
    assert production.env == {"A": "1", "B": "prod", "C": "3", "FLAG": "true", "N": "3"}
    with pytest.raises(ConfigError, match="no app has env_staging; known: production"):
        parse_ecosystem(path, env_name="staging")


def test_env_overlay_without_base_env() -> None:
    assert app_in(Path("/"), {"env_dev": {"X": "y"}}, env_name="dev").env == {"X": "y"}


@pytest.mark.parametrize("env", [{"": "x"}, {"A=B": "x"}, {"A": {"b": "c"}}, {"A": ["x"]}, "A=1"])
def test_bad_env_is_rejected(env: object) -> None:
    rejected("env", env)


# ---------------------------------------------------------------- --only


ONLY_FILE = """
[[apps]]
name = "web"
script = "web.py"

[[apps]]
name = "worker"
script = "worker.py"

[[apps]]
name = "cron"
script = "cron.py"
"""


def test_only_selects_apps_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path / "e.toml", ONLY_FILE)
    assert [s.name for s in parse_ecosystem(path)] == ["web", "worker", "cron"]
    assert [s.name for s in parse_ecosystem(path, only=["worker"])] == ["worker"]
    assert [s.name for s in parse_ecosystem(path, only=["cron", "web"])] == ["web", "cron"]


def test_only_unknown_name_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "e.toml", ONLY_FILE)
    with pytest.raises(ConfigError) as caught:
        parse_ecosystem(path, only=["web", "wrker"])
    assert str(caught.value) == f'{path}: --only "wrker": no app of that name in the file'


def test_only_still_validates_every_app(tmp_path: Path) -> None:
    path = write(tmp_path / "e.toml", ONLY_FILE + 'instances = "four"\n')
    with pytest.raises(ConfigError, match=r'app "cron" \(apps\[2\]\): instances must be'):
        parse_ecosystem(path, only=["web"])


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        parse_ecosystem(path)
    assert str(caught.value) == f"{path}: no such file"


# ---------------------------------------------------------------- the table round trip


EVERY_OPTION = """
[[apps]]
name = "full"
script = "bin/server.py"
args = ["--workers", "{instance}", "--fd", "{fd}"]
interpreter = "/usr/bin/python3"
interpreter_args = "-X dev -u"
cwd = "srv"
env = { MODE = "demo", API_TOKEN = "t0k3n" }
env_production = { MODE = "production" }
instances = 3
exec_mode = "cluster"
listen = ["127.0.0.1:8000", "[::1]:8001"]
reuse_port = true
user = "nobody"
group = "nogroup"
autorestart = false
max_restarts = 7
min_uptime = "2s"
restart_delay = 250
exp_backoff_restart_delay = "100ms"
kill_timeout = "1.5s"
stop_signal = "int"
shutdown_with_message = true
preload = false
wait_ready = true
ready_check = "http://127.0.0.1:{port}/health"
listen_timeout = "1m"
reload_mode = "restart"
out_file = "logs/out.log"
error_file = "logs/err.log"
merge_logs = true
log_date_format = "%Y-%m-%d %H:%M:%S"
max_log_size = "10M"
retain = 2
max_memory_restart = "300M"
memory_limit_samples = 3
watch = ["src", "lib"]
ignore_watch = ["*.log"]
watch_delay = "2s"
cron_restart = "0 3 * * *"
"""


@pytest.fixture
def full_spec(tmp_path: Path) -> AppSpec:
    (spec,) = parse_ecosystem(write(tmp_path / "ecosystem.toml", EVERY_OPTION), env_name="production")
    return spec


def test_round_trip_spec_sets_every_option(full_spec: AppSpec) -> None:
    defaults = [o.name for o in OPTIONS if o.name != "port" and getattr(full_spec, o.field) == o.default]
    assert defaults == [], "the round-trip spec should set every option"


def test_to_table_round_trip(full_spec: AppSpec) -> None:
    assert spec_from_table(full_spec.to_table()) == full_spec


def test_to_table_round_trip_through_toml(full_spec: AppSpec, tmp_path: Path) -> None:
    """What `pmx save` writes is an ecosystem file giving back the same spec."""
    dump = write(tmp_path / "elsewhere" / "dump.toml", tomli_w.dumps({"apps": [full_spec.to_table()]}))
    assert parse_ecosystem(dump) == [full_spec]


def test_to_table_writes_milliseconds_and_bytes(full_spec: AppSpec) -> None:
    table = full_spec.to_table()
    assert table["kill_timeout"] == 1500
    assert table["listen_timeout"] == 60000
    assert table["max_memory_restart"] == 300 * 1024**2
    assert table["env"] == {"MODE": "production", "API_TOKEN": "t0k3n"}
    assert "port" not in table
    assert not any(key.startswith("env_") for key in table)


def test_port_shorthand_round_trips_as_listen() -> None:
    spec = app(exec_mode="cluster", port=9000)
    table = spec.to_table()
    assert table["listen"] == ["0.0.0.0:9000"]
    assert spec_from_table(table) == spec


def test_default_spec_round_trips() -> None:
    spec = app(script="/srv/api.py")
    assert spec_from_table(spec.to_table()) == spec


# ---------------------------------------------------------------- secrets


def test_mask_env_masks_secret_looking_names() -> None:
    env = {
        "API_TOKEN": "t", "DB_PASSWORD": "p", "client_secret": "s", "AWS_ACCESS_KEY_ID": "k",
        "SSH_PRIVATE": "x", "PATH": "/bin", "PORT": "8000", "MODE": "demo",
    }
    assert mask_env(env) == {
        "API_TOKEN": MASK, "DB_PASSWORD": MASK, "client_secret": MASK, "AWS_ACCESS_KEY_ID": MASK,
        "SSH_PRIVATE": MASK, "PATH": "/bin", "PORT": "8000", "MODE": "demo",
    }
    assert env["API_TOKEN"] == "t", "mask_env must not change its argument"


def test_mask_env_with_custom_markers() -> None:
    assert mask_env({"MY_PIN": "1234", "API_TOKEN": "t"}, markers=("PIN",)) == {
        "MY_PIN": MASK, "API_TOKEN": "t"}


# ---------------------------------------------------------------- fixed bugs (each once reported)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_duration_is_rejected(value: float) -> None:
    rejected("kill_timeout", value)


def test_name_with_trailing_newline_is_rejected() -> None:
    with pytest.raises(ConfigError):
        app(name="api\n")


def test_boolean_in_args_list_is_rejected() -> None:
    rejected("args", ["--verbose", True])


def test_listen_port_with_superscript_digit_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        app(exec_mode="cluster", listen="127.0.0.1:²")


@pytest.mark.parametrize(("key", "value"), [("env", {"A": "x\0y"}), ("args", ["x\0y"]), ("script", "a\0b")])
def test_nul_byte_is_rejected(key: str, value: object) -> None:
    with pytest.raises(ConfigError):
        app(**{key: value})


@pytest.mark.parametrize("options", [{"kill_timeout": "soon\nlater"}, {"name": "a\nb", "stop_signal": "x"}])
def test_error_is_one_line_even_when_the_value_has_a_newline(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError) as caught:
        app(**options)
    assert "\n" not in str(caught.value)


def test_sub_millisecond_duration_round_trips() -> None:
    spec = app(restart_delay="0.5ms")
    assert spec_from_table(spec.to_table()) == spec
