"""Secret references and values: env:/file: resolution, the header-safe value check, the
gateway's stdin document, and a mapping that never shows a value. Every error names the
reference; none holds the value (or a literal that may be the key)."""

from __future__ import annotations

import os
import pickle
import threading
from pathlib import Path

import pytest

from microagent.broker.credentials import (
    SECRET_MAX,
    Secrets,
    check_secret,
    parse_secrets,
    resolve_source,
)
from microagent.errors import InvalidInputError

VALUE = "sk-ant-api03-SENTINEL-9f8e7d6c"


def _error(source: str, environ: dict[str, str] | None = None) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as caught:
        resolve_source(source, environ=environ or {})
    return caught.value


def test_env_source_reads_the_variable() -> None:
    assert resolve_source("env:MODEL_KEY", environ={"MODEL_KEY": VALUE}) == VALUE


def test_env_source_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROAGENT_TEST_KEY", VALUE)
    assert resolve_source("env:MICROAGENT_TEST_KEY") == VALUE


def test_a_missing_or_empty_variable_names_the_reference() -> None:
    error = _error("env:MODEL_KEY")
    assert "env:MODEL_KEY" in error.message
    assert "not set" in error.message
    assert "export MODEL_KEY" in error.hint
    assert "is empty" in _error("env:MODEL_KEY", {"MODEL_KEY": ""}).message


def test_a_value_unfit_for_a_header_is_refused_without_showing_it() -> None:
    for bad in (VALUE + "\r\nX-Injected: 1", VALUE + "\n", VALUE + "é", "a" * (SECRET_MAX + 1)):
        error = _error("env:MODEL_KEY", {"MODEL_KEY": bad})
        assert "env:MODEL_KEY" in error.message
        assert VALUE not in error.message + error.hint
        assert "aaaa" not in error.message


@pytest.mark.parametrize(
    "source",
    [VALUE, "Bearer " + VALUE, "literal:" + VALUE, "env:" + VALUE, "file:" + VALUE, ""],
)
def test_literals_and_bad_references_are_refused_and_never_echoed(source: str) -> None:
    error = _error(source)
    assert VALUE not in error.message + error.hint
    assert "env:" in error.message + error.hint


def test_file_source_reads_the_first_line_stripped(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text(f"  {VALUE}  \r\nsecond line is ignored\n")
    assert resolve_source(f"file:{path}") == VALUE
    path.write_text(VALUE)  # no newline at all
    assert resolve_source(f"file:{path}") == VALUE


def test_file_source_errors_name_the_reference(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert f"file:{missing}: no such file" in _error(f"file:{missing}").message
    assert "absolute" in _error("file:relative/key").message
    assert "not a regular file" in _error(f"file:{tmp_path}").message
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert "empty" in _error(f"file:{empty}").message
    long = tmp_path / "long"
    long.write_text("k" * (SECRET_MAX + 1) + "\n")
    assert "longer than 4096" in _error(f"file:{long}").message
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" + VALUE.encode())
    assert "printable ASCII" in _error(f"file:{binary}").message


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    outcome: list[str] = []
    worker = threading.Thread(target=lambda: outcome.append(_error(f"file:{fifo}").message))
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "resolving a FIFO blocked"
    assert "not a regular file" in outcome[0]


def test_check_secret_bounds() -> None:
    assert check_secret("k" * SECRET_MAX) == "k" * SECRET_MAX
    assert check_secret(" ~") == " ~"
    for bad in ("", "k" * (SECRET_MAX + 1), "a\tb", "a\x7fb", "caf\u00e9", "a\rb", "a\nb"):
        with pytest.raises(InvalidInputError, match="the secret"):
            check_secret(bad)


def test_secrets_never_show_a_value() -> None:
    secrets = Secrets({"anthropic": VALUE})
    assert secrets["anthropic"] == VALUE
    assert dict(secrets) == {"anthropic": VALUE}
    for text in (repr(secrets), str(secrets), f"{secrets}", repr([secrets])):
        assert VALUE not in text
        assert "anthropic" in text
    with pytest.raises(TypeError):
        pickle.dumps(secrets)


def test_parse_secrets_wants_one_checked_value_per_credential() -> None:
    document = f'{{"anthropic": "{VALUE}", "openai": "sk-other"}}'.encode()
    secrets = parse_secrets(document, ["anthropic", "openai"])
    assert secrets["openai"] == "sk-other"
    assert len(parse_secrets(b"", [])) == 0
    cases = {
        b'{"anthropic": "x"}': "no value for credential 'openai'",
        f'{{"anthropic": "{VALUE}", "openai": "a", "extra": "b"}}'.encode(): "extra",
        b'{"anthropic": 5, "openai": "a"}': "not a string",
        f'{{"anthropic": "{VALUE}\\n", "openai": "a"}}'.encode(): "printable ASCII",
        f'["{VALUE}"]'.encode(): "not a JSON object",
        f'{{"anthropic": "{VALUE}"'.encode(): "not valid JSON",
        b"": "no value for credential 'anthropic'",
        b" " * (65 << 10): "larger than",
    }
    for data, expected in cases.items():
        with pytest.raises(InvalidInputError) as caught:
            parse_secrets(data, ["anthropic", "openai"])
        assert expected in caught.value.message
        assert VALUE not in caught.value.message


def test_a_file_source_under_the_home_folder_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".keys").mkdir()
    (tmp_path / ".keys" / "internal").write_text("tok-123\n")
    assert resolve_source("file:~/.keys/internal") == "tok-123"
