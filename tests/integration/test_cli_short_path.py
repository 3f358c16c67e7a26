"""`pmx list` and `pmx ping` take a short path (cli/entry.py) that imports no click or rich."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import Pmx

HEAVY = ("click", "rich", "psutil", "textual", "tomllib", "tomli_w", "asyncio", "zmq",
         "typing")

PROBE = f"""
HEAVY = {HEAVY!r}
import json, sys
sys.argv = ["pmx", *sys.argv[1:]]
from pmx.cli import entry
try:
    entry.main()
except SystemExit as exc:
    code = exc.code
heavy = sorted({{m.split(".")[0] for m in sys.modules}} & set(HEAVY))
sys.stderr.write("\\nHEAVY=" + json.dumps(heavy) + " CODE=" + str(code) + "\\n")
"""


def _probe(pmx: Pmx, *args: str) -> tuple[str, list[str], int]:
    result = subprocess.run([sys.executable, "-c", PROBE, *args], env=pmx.env,
                            capture_output=True, text=True, timeout=30)
    tail = result.stderr.rsplit("HEAVY=", 1)[1]
    heavy, code = tail.split(" CODE=")
    return result.stdout, json.loads(heavy), int(code.strip())


def test_list_json_and_ping_import_nothing_heavy(pmxd: Pmx) -> None:
    pmx = pmxd
    pmx.run("start", "/bin/sleep", "--name", "nap", "--interpreter", "none", "--", "1000")
    for args in (("list",), ("ls", "--json"), ("status",), ("ping",)):
        out, heavy, code = _probe(pmx, *args)
        assert code == 0, out
        assert heavy == [], f"pmx {' '.join(args)} imported {heavy}"
    out, _, _ = _probe(pmx, "list", "--json")
    assert json.loads(out)[0]["name"] == "nap"
    out, _, _ = _probe(pmx, "list")
    assert "nap:0" in out and "online" in out


def test_without_a_daemon_the_short_path_says_so_with_the_usual_code(pmx: Pmx) -> None:
    result = pmx.run("list", check=False)
    assert result.returncode == 3, result
    assert result.stderr.startswith("pmx: pmxd is not running"), result.stderr
    assert result.stdout == ""


def test_a_closed_pipe_is_not_an_error(pmxd: Pmx) -> None:
    pmx = pmxd
    pmx.run("start", "/bin/sleep", "--name", "nap", "-i", "40", "--interpreter", "none", "--", "1000")
    command = f"{sys.executable} -m pmx.cli.entry list | head -1"
    result = subprocess.run(["sh", "-c", command], env=pmx.env, capture_output=True, text=True,
                            timeout=30)
    assert result.stdout.startswith("id"), result
    assert "Error" not in result.stderr and "Exception" not in result.stderr, result.stderr


def _ask_quick(pmx: Pmx, payload: bytes) -> dict[str, object]:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(pmx.home / "quick.sock"))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


def test_the_quick_socket_answers_list_and_ping_only_and_survives_garbage(pmxd: Pmx) -> None:
    pmx = pmxd
    assert oct((pmx.home / "quick.sock").stat().st_mode & 0o777) == "0o600"
    listed = _ask_quick(pmx, b'{"v":1,"id":"q1","cmd":"list"}')
    assert listed["ok"] is True and listed["id"] == "q1"
    refused = _ask_quick(pmx, b'{"v":1,"id":"q2","cmd":"kill"}')
    assert refused["ok"] is False and "list and ping" in str(refused["error"])
    garbage = _ask_quick(pmx, b"\xff not json")
    assert garbage["ok"] is False
    assert "is up" in pmx.run("ping").stdout  # pmxd is fine, and so is the control socket


def test_the_short_path_names_the_quick_socket_as_home_py_does() -> None:
    from pmx.cli import entry
    from pmx.supervisor import home

    assert entry.QUICK_SOCKET == home.QUICK_SOCKET
