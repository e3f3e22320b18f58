"""Cache references and where their defaults come from (flags > env > user config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from microagent.errors import InvalidInputError
from microagent.remotecache.refs import cache_from_refs, cache_to_ref, parse_cache_ref
from microagent.settings import Settings


def test_registry_and_layout_references(tmp_path: Path) -> None:
    ref = parse_cache_ref("registry.example.com:5000/team/agent:v2")
    assert (ref.where, ref.tag) == ("registry.example.com:5000/team/agent", "v2")
    assert parse_cache_ref("ghcr.io/acme/cache").tag == "latest"
    layout = parse_cache_ref("oci:cache:nightly", tmp_path)
    assert (layout.layout, layout.tag, layout.where) == (
        tmp_path / "cache",
        "nightly",
        f"oci:{tmp_path / 'cache'}",
    )
    with pytest.raises(InvalidInputError, match="must not name a digest"):
        parse_cache_ref("ghcr.io/acme/cache@sha256:" + "0" * 64)
    with pytest.raises(InvalidInputError, match="empty"):
        parse_cache_ref("  ")


@pytest.fixture
def user_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(
        "registries: {}\ncache:\n  from: [cfg.example/a, cfg.example/b]\n  to: cfg.example/ci\n"
    )
    monkeypatch.setenv("MICROAGENT_CONFIG", str(config))
    monkeypatch.delenv("MICROAGENT_CACHE_FROM", raising=False)
    monkeypatch.delenv("MICROAGENT_CACHE_TO", raising=False)
    return config


def test_defaults_come_from_the_user_config(user_config: Path) -> None:
    settings = Settings.from_environ()
    assert [r.where for r in cache_from_refs((), settings)] == ["cfg.example/a", "cfg.example/b"]
    to = cache_to_ref(None, settings)
    assert to is not None and to.where == "cfg.example/ci"


def test_environment_wins_over_the_config_even_when_empty(
    user_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROAGENT_CACHE_FROM", "env.example/x, env.example/y")
    settings = Settings.from_environ()
    assert [r.where for r in cache_from_refs((), settings)] == ["env.example/x", "env.example/y"]
    monkeypatch.setenv("MICROAGENT_CACHE_FROM", "")
    monkeypatch.setenv("MICROAGENT_CACHE_TO", "")
    settings = Settings.from_environ()
    assert cache_from_refs((), settings) == () and cache_to_ref(None, settings) is None


def test_flags_win_over_everything(user_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROAGENT_CACHE_FROM", "env.example/x")
    settings = Settings.from_environ()
    refs = cache_from_refs(("flag.example/one", "flag.example/two,oci:/tmp/c"), settings)
    assert [r.where for r in refs] == ["flag.example/one", "flag.example/two", "oci:/tmp/c"]
    to = cache_to_ref("flag.example/push", settings)
    assert to is not None and to.where == "flag.example/push"


def test_no_defaults_means_no_remote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICROAGENT_CONFIG", str(tmp_path / "missing.yaml"))
    monkeypatch.delenv("MICROAGENT_CACHE_FROM", raising=False)
    monkeypatch.delenv("MICROAGENT_CACHE_TO", raising=False)
    settings = Settings.from_environ()
    assert cache_from_refs((), settings) == () and cache_to_ref(None, settings) is None


def test_urls_in_messages_carry_no_credentials_or_upload_state() -> None:
    from microagent.oci.registry import _redacted

    url = "https://ci:s3cret@ghcr.io/v2/acme/cache/blobs/uploads/u1?_state=tok&digest=sha256:1"
    assert _redacted(url) == "https://ghcr.io/v2/acme/cache/blobs/uploads/u1"
    assert _redacted("http://127.0.0.1:5000/v2/x/manifests/y") == (
        "http://127.0.0.1:5000/v2/x/manifests/y"
    )
