"""The invalid-config corpus: each tests/configs/invalid/NAME.toml must fail with the one
line in NAME.expected, where "{file}" stands for the path given to parse_ecosystem."""

from __future__ import annotations

from pathlib import Path

import pytest
from pmx.supervisor.config import parse_ecosystem
from pmx.supervisor.errors import ConfigError

CORPUS = Path(__file__).resolve().parent.parent / "configs" / "invalid"
CASES = sorted(CORPUS.glob("*.toml"))


def expected_line(toml: Path, file: str) -> str:
    text = toml.with_suffix(".expected").read_text(encoding="utf-8")
    assert text.count("\n") <= 1, f"{toml.name}: the .expected file must hold one line"
    # str.replace, not str.format: messages may contain braces ("{port}").
    return text.rstrip("\n").replace("{file}", file)


def test_corpus_is_not_empty() -> None:
    assert len(CASES) >= 14


def test_every_toml_has_an_expected_line() -> None:
    missing = [case.name for case in CASES if not case.with_suffix(".expected").is_file()]
    assert missing == []


def test_every_expected_line_has_a_toml() -> None:
    orphans = [path.name for path in CORPUS.glob("*.expected") if not path.with_suffix(".toml").is_file()]
    assert orphans == []


@pytest.mark.parametrize("toml", CASES, ids=[case.stem for case in CASES])
def test_invalid_config_raises_the_expected_line(toml: Path) -> None:
    file = str(toml)
    with pytest.raises(ConfigError) as caught:
        parse_ecosystem(file)
    message = str(caught.value)
    assert message == expected_line(toml, file)
    assert "\n" not in message


@pytest.mark.parametrize("toml", CASES, ids=[case.stem for case in CASES])
def test_invalid_config_message_names_the_path_it_was_given(toml: Path, tmp_path: Path) -> None:
    """The message carries the path it was given, whatever the file is called."""
    copy = tmp_path / "ecosystem.toml"
    copy.write_bytes(toml.read_bytes())
    with pytest.raises(ConfigError) as caught:
        parse_ecosystem(copy)
    assert str(caught.value) == expected_line(toml, str(copy))
