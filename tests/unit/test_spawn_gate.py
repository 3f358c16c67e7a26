"""Which spawns may go through the sh shim that enters the cgroup (spawn.py): only those
that sh's `exec` runs exactly as execve would (exec_format.py). Anything else goes
through subprocess, whose execve error is the spawn's error."""

from __future__ import annotations

import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
from pmx.supervisor.exec_format import execve_runs_it


def _script(path: Path, text: str | bytes) -> str:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(0o755)
    return str(path)


def _sleep() -> Path:
    found = shutil.which("sleep")
    assert found is not None
    return Path(os.path.realpath(found))


def test_an_elf_binary_and_a_script_whose_interpreter_is_there_go_through_sh(tmp_path: Path) -> None:
    cwd = str(tmp_path)
    assert execve_runs_it(str(_sleep()), cwd)
    assert execve_runs_it(_script(tmp_path / "ok.sh", "#!/bin/sh\necho hi\n"), cwd)
    assert execve_runs_it(_script(tmp_path / "spaced.sh", "#!  /bin/sh -e\necho hi\n"), cwd)
    inner = _script(tmp_path / "inner", "#!/bin/sh\necho hi\n")
    assert execve_runs_it(_script(tmp_path / "nested", f"#!{inner}\nx\n"), cwd)
    # a relative interpreter is the app's directory's, not pmxd's
    assert execve_runs_it(_script(tmp_path / "relative", "#!inner\nx\n"), cwd)
    assert not execve_runs_it(str(tmp_path / "relative"), "/")


def test_what_execve_would_refuse_does_not(tmp_path: Path) -> None:
    # sh would run these as shell scripts (ENOEXEC) or call them "not found" (exit 127)
    cwd = str(tmp_path)
    assert not execve_runs_it(_script(tmp_path / "plain", "echo no shebang\n"), cwd)
    assert not execve_runs_it(_script(tmp_path / "bytes", "\x00\x01garbage\n"), cwd)
    assert not execve_runs_it(_script(tmp_path / "empty", ""), cwd)
    assert not execve_runs_it(_script(tmp_path / "gone", "#!/no/such/interpreter\nx\n"), cwd)
    assert not execve_runs_it(_script(tmp_path / "noline", "#!/bin/sh"), cwd)  # no end of line
    assert not execve_runs_it(_script(tmp_path / "blank", "#!\nx\n"), cwd)
    plain = _script(tmp_path / "plain-interpreter", "echo I have no shebang\n")
    assert not execve_runs_it(_script(tmp_path / "via-plain", f"#!{plain}\nx\n"), cwd)
    loop = tmp_path / "loop"
    _script(loop, f"#!{loop}\nx\n")  # its own interpreter: the kernel gives up (ELOOP)
    assert not execve_runs_it(str(loop), cwd)
    assert not execve_runs_it(str(tmp_path), cwd)  # a directory
    assert not execve_runs_it(str(tmp_path / "missing"), cwd)


def test_an_elf_of_another_machine_or_without_its_loader_does_not(tmp_path: Path) -> None:
    binary = _sleep().read_bytes()
    machine = struct.unpack_from("<H", binary, 18)[0]
    foreign = bytearray(binary)
    struct.pack_into("<H", foreign, 18, 40 if machine != 40 else 62)  # ARM, else x86-64
    assert not execve_runs_it(_script(tmp_path / "foreign", bytes(foreign)), str(tmp_path))
    loader = next((path for path in (b"/lib64/ld-linux-x86-64.so.2", b"/lib/ld-linux-aarch64.so.1")
                   if path in binary), None)
    if loader is not None:  # a dynamically linked sleep: its loader renamed to nowhere
        gone = binary.replace(loader, loader.replace(b"ld-", b"xx-"))
        assert not execve_runs_it(_script(tmp_path / "no-loader", gone), str(tmp_path))


def test_a_fifo_in_place_of_the_program_neither_blocks_nor_passes(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o755)
    answer: list[bool] = []
    reader = threading.Thread(target=lambda: answer.append(execve_runs_it(str(fifo), "/")),
                              daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert answer == [False]


def test_a_missing_interpreter_is_named_in_the_spawn_error(tmp_path: Path) -> None:
    """execve's ENOENT names the script; the error says what is missing."""
    from pmx.supervisor.config import spec_from_table
    from pmx.supervisor.errors import SpawnError
    from pmx.supervisor.spawn import Identity, spawn

    script = _script(tmp_path / "job.sh", "#!/no/such/interpreter\necho hi\n")
    spec = spec_from_table({"name": "job", "script": script, "interpreter": "none",
                            "cwd": str(tmp_path)}, source="test")
    with pytest.raises(SpawnError) as raised:
        spawn(spec, Identity("job", 0, 0), {}, None, None)
    assert str(raised.value) == (f'cannot start app "job": {script}: its #! interpreter '
                                 "/no/such/interpreter is not there")
