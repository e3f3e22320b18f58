"""Image references and the lock file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from microagent.compiler.lock import LockEntry, LockFile, read_lock, write_lock
from microagent.compiler.refs import parse_any_ref, parse_image_ref, parse_layout_ref
from microagent.errors import InvalidInputError

D = "sha256:" + "a1" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("python", "docker.io/library/python:latest"),
        ("python:3.13-slim", "docker.io/library/python:3.13-slim"),
        ("docker.io/python:3.13", "docker.io/library/python:3.13"),
        ("org/img:1", "docker.io/org/img:1"),
        ("ghcr.io/org/img:v1.2", "ghcr.io/org/img:v1.2"),
        ("localhost/img", "localhost/img:latest"),
        ("127.0.0.1:5000/library/python:3.13-slim", "127.0.0.1:5000/library/python:3.13-slim"),
        (f"python@{D}", f"docker.io/library/python@{D}"),
        (f"python:3.13-slim@{D}", f"docker.io/library/python:3.13-slim@{D}"),
    ],
)
def test_normalisation(text: str, expected: str) -> None:
    assert str(parse_image_ref(text)) == expected


@pytest.mark.parametrize(
    "text", ["Python:3", "python:bad tag", "python@sha256:123", "reg.io/UPPER/x", "a//b"]
)
def test_invalid_refs(text: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid"):
        parse_image_ref(text)


def test_layout_refs(tmp_path: Path) -> None:
    ref = parse_layout_ref("oci:./layout:3.13", tmp_path)
    assert (ref.path, ref.tag) == (tmp_path / "layout", "3.13")
    assert parse_layout_ref("oci:/abs/dir", tmp_path).tag is None
    assert parse_any_ref(f"oci:x@{D}", tmp_path).digest == D
    assert parse_any_ref("python", tmp_path).tag == "latest"


def test_lock_round_trip(tmp_path: Path) -> None:
    lock = LockFile(tmp_path / "microagent.lock").with_entry(
        "python:3.13-slim",
        LockEntry("docker.io/library/python:3.13-slim", D, {"linux/amd64": "sha256:" + "b2" * 32}),
    )
    write_lock(lock)
    again = read_lock(lock.path)
    assert again == lock
    resolved = again.lookup("python:3.13-slim", "linux/amd64") if again else None
    assert resolved is not None and resolved.platform_digest == "sha256:" + "b2" * 32
    assert list(tmp_path.iterdir()) == [lock.path]


@pytest.mark.parametrize(
    "content",
    ["{", json.dumps({"lockVersion": 9}), json.dumps({"lockVersion": 1, "images": {"x": {}}})],
)
def test_bad_lock_is_a_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "microagent.lock"
    path.write_text(content)
    with pytest.raises(InvalidInputError, match="invalid lock file"):
        read_lock(path)


def test_absent_lock_is_none(tmp_path: Path) -> None:
    assert read_lock(tmp_path / "microagent.lock") is None
