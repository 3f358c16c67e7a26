"""Which spawns may go through the sh shim that enters the cgroup (spawn.py): only those
that sh's `exec` runs exactly as execve would. Anything else goes through subprocess,
whose execve error is the spawn's error (and whose process pmxd moves after)."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from pmx.supervisor.spawn import _execve_runs_it


def _script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def test_an_elf_binary_and_a_script_whose_interpreter_is_there_go_through_sh(tmp_path: Path) -> None:
    sleep = shutil.which("sleep")
    assert sleep is not None
    assert _execve_runs_it(os.path.realpath(sleep))
    assert _execve_runs_it(_script(tmp_path / "ok.sh", "#!/bin/sh\necho hi\n"))
    assert _execve_runs_it(_script(tmp_path / "spaced.sh", "#!  /bin/sh -e\necho hi\n"))


def test_what_execve_would_refuse_does_not(tmp_path: Path) -> None:
    # sh would run these as shell scripts (ENOEXEC) or call them "not found"
    assert not _execve_runs_it(_script(tmp_path / "plain", "echo no shebang\n"))
    assert not _execve_runs_it(_script(tmp_path / "bytes", "\x00\x01garbage\n"))
    assert not _execve_runs_it(_script(tmp_path / "empty", ""))
    assert not _execve_runs_it(_script(tmp_path / "gone", "#!/no/such/interpreter\nx\n"))
    assert not _execve_runs_it(_script(tmp_path / "noline", "#!/bin/sh"))  # no end of line
    assert not _execve_runs_it(_script(tmp_path / "blank", "#!\nx\n"))
    assert not _execve_runs_it(str(tmp_path))  # a directory
    assert not _execve_runs_it(str(tmp_path / "missing"))


def test_a_fifo_in_place_of_the_program_neither_blocks_nor_passes(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o755)
    answer: list[bool] = []
    reader = threading.Thread(target=lambda: answer.append(_execve_runs_it(str(fifo))), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert answer == [False]
