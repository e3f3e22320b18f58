"""Spec `credentials` and `network.allow`: presets, overrides, every refusal, the flags, the
hostile-spec confirmation rule and the plan key (pure compiler; create is tested in
tests/unit/test_credentials_cli.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from microagent.compiler.credentials import (
    PRESETS,
    Credential,
    check_format,
    check_header,
    check_source,
    check_upstream,
    credential_from_spec,
    key_env_warnings,
    parse_credential_flag,
    parse_upstream_flag,
)
from microagent.compiler.loader import load_spec
from microagent.compiler.lock import ResolvedImage
from microagent.compiler.overrides import Overrides, apply_overrides, confirm_credentials
from microagent.compiler.plan import compile_plan
from microagent.compiler.spec import NetworkMode, Spec, check_allow_entry
from microagent.errors import InvalidInputError, SpecError

LITERAL = "sk-ant-literal-0123456789"
IMAGE = ResolvedImage("python", "sha256:" + "a" * 64, "linux/amd64")
GENERIC = (
    "  - name: internal\n"
    "    from: env:INTERNAL_TOKEN\n"
    "    upstream: https://api.internal.example/v2/\n"
    "    header: Authorization\n"
    '    format: "Bearer {value}"\n'
    "    baseUrlEnv: INTERNAL_BASE_URL\n"
    "    keyEnv: INTERNAL_TOKEN\n"
)


def spec_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "microagent.yaml"
    path.write_text("name: c\nimage: python@sha256:" + "a" * 64 + "\nentrypoint: 'true'\n" + body)
    return path


def load(tmp_path: Path, body: str) -> Spec:
    return load_spec(spec_file(tmp_path, body))


def problems(tmp_path: Path, body: str) -> str:
    with pytest.raises(SpecError) as info:
        load(tmp_path, body)
    return info.value.render()


# -- presets and spec entries ---------------------------------------------------------------


def test_presets_by_name(tmp_path: Path) -> None:
    spec = load(tmp_path, "credentials: [{name: anthropic}, {name: openai}, {name: gemini}]\n")
    assert spec.credentials == tuple(PRESETS.values())
    anthropic, openai, gemini = spec.credentials
    assert (anthropic.upstream, anthropic.header, anthropic.format) == (
        "https://api.anthropic.com",
        "x-api-key",
        "{value}",
    )
    assert (anthropic.source, anthropic.base_url_env, anthropic.key_env) == (
        "env:ANTHROPIC_API_KEY",
        "ANTHROPIC_BASE_URL",
        "ANTHROPIC_API_KEY",
    )
    assert (openai.upstream, openai.header, openai.format, openai.base_url_env) == (
        "https://api.openai.com/v1",
        "Authorization",
        "Bearer {value}",
        "OPENAI_BASE_URL",
    )
    assert (gemini.upstream, gemini.header, gemini.base_url_env, gemini.key_env) == (
        "https://generativelanguage.googleapis.com",
        "x-goog-api-key",
        "GOOGLE_GEMINI_BASE_URL",
        "GEMINI_API_KEY",
    )
    assert not any(c.needs_confirmation for c in spec.credentials)


def test_preset_fields_can_be_overridden(tmp_path: Path) -> None:
    spec = load(
        tmp_path,
        "credentials:\n"
        "  - {name: openai, from: 'file:~/.config/openai/key', upstream: 'HTTPS://GW.Example/v1/',"
        " keyEnv: MY_KEY}\n",
    )
    (cred,) = spec.credentials
    assert cred.source == "file:~/.config/openai/key"
    assert cred.upstream == "https://gw.example/v1"  # normalised
    assert (cred.header, cred.format, cred.base_url_env, cred.key_env) == (
        "Authorization",
        "Bearer {value}",
        "OPENAI_BASE_URL",
        "MY_KEY",
    )


def test_generic_credential(tmp_path: Path) -> None:
    (cred,) = load(tmp_path, "credentials:\n" + GENERIC).credentials
    assert cred == Credential(
        "internal",
        "env:INTERNAL_TOKEN",
        "https://api.internal.example/v2",
        "Authorization",
        "Bearer {value}",
        "INTERNAL_BASE_URL",
        "INTERNAL_TOKEN",
    )
    assert cred.needs_confirmation and cred.preset is None
    minimal, found = credential_from_spec(
        {
            "name": "x",
            "from": "env:X",
            "upstream": "https://x.example",
            "header": "X-Key",
            "baseUrlEnv": "X_URL",
            "keyEnv": "X_KEY",
        }
    )
    assert found == [] and minimal is not None and minimal.format == "{value}"


def test_credential_json_round_trip() -> None:
    for cred in PRESETS.values():
        assert Credential.from_json(cred.to_json()) == cred
    data = PRESETS["anthropic"].to_json()
    assert set(data) == {"name", "source", "upstream", "header", "format", "baseUrlEnv", "keyEnv"}
    for key, bad in (
        ("source", LITERAL),
        ("upstream", "http://example.com"),
        ("header", "Host"),
        ("format", "Bearer"),
        ("keyEnv", "ANTHROPIC_BASE_URL"),  # the same as baseUrlEnv
        ("name", "Upper"),
        ("name", 7),
    ):
        with pytest.raises(InvalidInputError):
            Credential.from_json({**data, key: bad})
    with pytest.raises(InvalidInputError):
        Credential.from_json({"name": "anthropic"})


@pytest.mark.parametrize(
    ("entry", "where", "message"),
    [
        ("{name: anthropic, from: " + LITERAL + "}", "credentials[0].from", "not the key itself"),
        ("{name: anthropic, from: 'env:'}", "credentials[0].from", "variable name"),
        ("{name: anthropic, from: 'env:1X'}", "credentials[0].from", "variable name"),
        ("{name: anthropic, from: 'file:key.txt'}", "credentials[0].from", "absolute"),
        ("{name: anthropic, from: 'file:~'}", "credentials[0].from", "absolute"),
        ("{name: anthropic, from: 'file:~other/k'}", "credentials[0].from", "absolute"),
        ("{name: anthropic, upstream: 'http://example.com'}", ".upstream", "only for a loopback"),
        ("{name: anthropic, upstream: 'ftp://example.com'}", ".upstream", "not an https URL"),
        ("{name: anthropic, upstream: 'https://'}", ".upstream", "not an https URL"),
        ("{name: anthropic, upstream: 'https://x.example/?a=1'}", ".upstream", "query"),
        ("{name: anthropic, upstream: 'https://x.example/#f'}", ".upstream", "fragment"),
        ("{name: anthropic, upstream: 'https://x.example:0'}", ".upstream", "port 0"),
        ("{name: anthropic, upstream: 'https://x.example:99999'}", ".upstream", "not a URL"),
        ("{name: anthropic, upstream: 'https://a b.example'}", ".upstream", "without spaces"),
        ("{name: anthropic, upstream: 'https://ü.example'}", ".upstream", "ASCII"),
        ("{name: anthropic, header: 'x key'}", ".header", "invalid value"),
        ("{name: anthropic, header: Host}", ".header", "frames the request"),
        ("{name: anthropic, header: Transfer-Encoding}", ".header", "frames the request"),
        ("{name: anthropic, format: 'Bearer'}", ".format", "exactly once"),
        ("{name: anthropic, format: '{value}{value}'}", ".format", "exactly once"),
        ('{name: anthropic, format: "Bearer {value}\\r\\nX: y"}', ".format", "printable ASCII"),
        ("{name: anthropic, baseUrlEnv: MICROAGENT_URL}", ".baseUrlEnv", "set by microagent"),
        ("{name: anthropic, keyEnv: HTTPS_PROXY}", ".keyEnv", "set by microagent"),
        ("{name: anthropic, keyEnv: no_proxy}", ".keyEnv", "set by microagent"),
        ("{name: anthropic, keyEnv: ANTHROPIC_BASE_URL}", ".keyEnv", "same variable"),
        ("{name: anthropic, keyEnv: '1X'}", ".keyEnv", "invalid value"),
        ("{name: Anthropic}", ".name", "invalid value"),
        ("{name: internal, from: 'env:T'}", "credentials[0]", "needs `upstream`"),
        ("{name: anthropic, token: x}", "credentials[0].token", "unknown key"),
    ],
)
def test_refusals_are_located(tmp_path: Path, entry: str, where: str, message: str) -> None:
    text = problems(tmp_path, f"credentials:\n  - {entry}\n")
    assert "microagent.yaml:5:" in text, text
    assert where in text and message in text, text


def test_literal_values_are_never_repeated(tmp_path: Path) -> None:
    text = problems(
        tmp_path,
        f"credentials:\n  - {{name: anthropic, from: {LITERAL}}}\n"
        f"  - {{name: gemini, upstream: 'https://user:{LITERAL}@x.example'}}\n",
    )
    assert LITERAL not in text
    assert "hint: write env:VAR or file:PATH" in text
    assert "carries user info" in text
    long = problems(tmp_path, f"credentials: [{{name: openai, from: '{LITERAL}{'x' * 5000}'}}]\n")
    assert "must be at most 4096 characters" in long and LITERAL not in long
    with pytest.raises(InvalidInputError) as info:
        parse_credential_flag(f"anthropic={LITERAL}")
    assert LITERAL not in info.value.render()


def test_loopback_upstreams_may_use_http() -> None:
    for url, expected in (
        ("http://127.0.0.1:9000/", "http://127.0.0.1:9000"),
        ("http://127.8.9.10", "http://127.8.9.10"),
        ("http://[::1]:8080/v1", "http://[::1]:8080/v1"),
        ("http://LOCALHOST:1", "http://localhost:1"),
    ):
        assert check_upstream(url) == expected
    for url in ("http://10.0.0.1", "http://[::2]", "http://localhost.example", "http://0.0.0.0"):
        with pytest.raises(InvalidInputError, match="loopback"):
            check_upstream(url)


def test_single_value_checks() -> None:
    assert check_source("env:ANTHROPIC_API_KEY") == "env:ANTHROPIC_API_KEY"
    assert check_source("file:/run/keys/a") == "file:/run/keys/a"
    assert check_source("file:~/.config/key") == "file:~/.config/key"
    with pytest.raises(InvalidInputError):
        check_source("file:/run/k\ney")
    assert check_header("x-api-key") == "x-api-key"
    assert check_format("Token {value}") == "Token {value}"
    with pytest.raises(InvalidInputError):
        check_format("Bearer {value}\u00e9")


def test_names_and_guest_variables_are_unique(tmp_path: Path) -> None:
    text = problems(
        tmp_path,
        "env: {ANTHROPIC_BASE_URL: x}\n"
        "credentials:\n"
        "  - {name: anthropic}\n"
        "  - {name: openai, keyEnv: GEMINI_API_KEY}\n"
        "  - {name: gemini}\n"
        "  - {name: openai}\n",
    )
    assert "credentials[0].baseUrlEnv: ANTHROPIC_BASE_URL is already set by env" in text
    assert "credentials[2].keyEnv: GEMINI_API_KEY is already set by credential 'openai'" in text
    assert "credentials[3].name: credential 'openai' is already declared in credentials[1]" in text
    many = "".join(f"  - {{name: c{i}, from: 'env:T'}}\n" for i in range(9))
    assert "credentials: must have at most 8 entries" in problems(tmp_path, "credentials:\n" + many)


# -- confirmation of a spec's credentials --------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "needs"),
    [
        ({"name": "anthropic"}, False),
        ({"name": "anthropic", "from": "env:WORK_ANTHROPIC_KEY"}, False),
        ({"name": "anthropic", "keyEnv": "CLAUDE_KEY", "baseUrlEnv": "CLAUDE_URL"}, False),
        ({"name": "anthropic", "upstream": "https://api.anthropic.com/"}, False),  # normalised
        ({"name": "anthropic", "upstream": "https://evil.example"}, True),
        ({"name": "anthropic", "upstream": "http://127.0.0.1:9"}, True),
        ({"name": "anthropic", "from": "file:/home/u/.ssh/id_ed25519"}, True),
        ({"name": "anthropic", "header": "Authorization"}, True),
        ({"name": "openai", "format": "{value}"}, True),
    ],
)
def test_which_spec_credentials_need_confirmation(entry: dict[str, str], needs: bool) -> None:
    cred, found = credential_from_spec(entry)
    assert found == [] and cred is not None
    assert cred.needs_confirmation is needs


def test_hostile_spec_needs_the_user_to_name_the_credential(tmp_path: Path) -> None:
    spec = load(
        tmp_path,
        "credentials:\n  - {name: anthropic}\n"
        "  - {name: openai, upstream: 'https://collector.evil.example'}\n" + GENERIC,
    )
    with pytest.raises(InvalidInputError) as info:
        confirm_credentials(spec, None)
    text = info.value.render()
    assert "'openai' would send env:OPENAI_API_KEY to https://collector.evil.example" in text
    assert "'internal' would send env:INTERNAL_TOKEN to https://api.internal.example/v2" in text
    assert "anthropic" not in text  # a stock preset needs no word from the user
    assert "--credential openai --credential internal" in info.value.hint
    with pytest.raises(InvalidInputError, match="'internal'"):
        confirm_credentials(spec, Overrides(credentials=("openai",)))
    # --credential-upstream is no confirmation of what the spec asks for
    with pytest.raises(InvalidInputError, match="'openai'"):
        confirm_credentials(
            spec,
            Overrides(
                credentials=("internal",),
                credential_upstreams=("openai=https://api.openai.com/v1",),
            ),
        )
    confirm_credentials(spec, Overrides(credentials=("openai", "internal=env:OTHER")))
    stock = load(tmp_path, "credentials: [{name: anthropic}, {name: gemini}]\n")
    confirm_credentials(stock, None)


# -- flags ---------------------------------------------------------------------------------


def test_credential_flags() -> None:
    assert parse_credential_flag("anthropic") == ("anthropic", None)
    assert parse_credential_flag("openai=file:~/k") == ("openai", "file:~/k")
    assert parse_upstream_flag("anthropic=http://127.0.0.1:9000/") == (
        "anthropic",
        "http://127.0.0.1:9000",
    )
    for bad in ("", "Bad", "anthropic=", "anthropic=key", "a" * 40):
        with pytest.raises(InvalidInputError, match="--credential"):
            parse_credential_flag(bad)
    for bad in ("anthropic", "anthropic=http://example.com", "=https://x.example"):
        with pytest.raises(InvalidInputError, match="--credential-upstream"):
            parse_upstream_flag(bad)


def test_flags_apply_to_the_spec(tmp_path: Path) -> None:
    spec = load(tmp_path, "credentials:\n  - {name: openai}\n" + GENERIC)
    out = apply_overrides(
        spec,
        Overrides(
            credentials=("anthropic", "internal=file:/run/token"),
            credential_upstreams=("anthropic=http://127.0.0.1:9000", "openai=https://gw.example"),
        ),
    )
    names = [c.name for c in out.credentials]
    assert names == ["openai", "internal", "anthropic"]  # a new preset is added last
    by_name = {c.name: c for c in out.credentials}
    assert by_name["anthropic"] == dataclasses.replace(
        PRESETS["anthropic"], upstream="http://127.0.0.1:9000"
    )
    assert by_name["internal"].source == "file:/run/token"
    assert by_name["openai"].upstream == "https://gw.example"
    assert apply_overrides(spec, Overrides()).credentials == spec.credentials


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (Overrides(credentials=("mystery",)), "not a preset"),
        (Overrides(credentials=("openai", "openai=env:X")), "given twice"),
        (Overrides(credential_upstreams=("gemini=https://x.example",)), "no such credential"),
        (
            Overrides(
                credential_upstreams=("openai=https://x.example", "openai=https://y.example")
            ),
            "given twice",
        ),
    ],
)
def test_bad_flag_combinations(tmp_path: Path, overrides: Overrides, message: str) -> None:
    spec = load(tmp_path, "credentials: [{name: openai}]\n")
    with pytest.raises(InvalidInputError, match=message):
        apply_overrides(spec, overrides)


def test_flag_credentials_are_checked_against_the_spec_env(tmp_path: Path) -> None:
    spec = load(tmp_path, "env: {ANTHROPIC_API_KEY: x}\n")
    with pytest.raises(InvalidInputError, match="ANTHROPIC_API_KEY is already set by env"):
        apply_overrides(spec, Overrides(credentials=("anthropic",)))


def test_key_env_warnings() -> None:
    warnings = key_env_warnings(["PATH", "OPENAI_API_KEY", "GOOGLE_API_KEY", "ANTHROPIC_API_KEY"])
    assert len(warnings) == 3
    assert warnings[0].startswith("--env ANTHROPIC_API_KEY puts the key inside the guest")
    assert "--credential anthropic" in warnings[0]
    assert "--credential gemini=env:GOOGLE_API_KEY" in warnings[1]
    assert "--credential openai" in warnings[2]
    assert key_env_warnings(["HOME", "API_KEY"]) == []


# -- network.allow -------------------------------------------------------------------------


def test_allow_entries(tmp_path: Path) -> None:
    spec = load(tmp_path, "network: {allow: [pypi.org, .PythonHosted.org, 'files.example.']}\n")
    assert spec.network.allow == ("pypi.org", ".pythonhosted.org", "files.example")
    isolated = load(tmp_path, "network: {mode: isolated, allow: [pypi.org]}\n")
    assert isolated.network.mode is NetworkMode.ISOLATED
    assert isolated.network.allow == ("pypi.org",)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("1.2.3.4", "is an IP address"),
        ("'[::1]'", "is an IP address"),
        ("'::1'", "is an IP address"),
        ("0x7f.1", "is an IP address"),
        ("evil.0x7f", "is an IP address"),
        ("'*.example.com'", "no wildcards"),
        ("'pypi.org:443'", "not a host name"),
        ("'https://pypi.org'", "not a host name"),
        ("'a..b'", "not a host name"),
        ("'.'", "not a host name"),
        ("'-a.example'", "not a host name"),
        ("'bü.example'", "not an ASCII host name"),
        ("'" + "a" * 64 + ".example'", "not a host name"),
        ("'" + ".".join(["a" * 63] * 3 + ["a" * 62]) + "'", "not a host name"),  # 254
    ],
)
def test_bad_allow_entries(tmp_path: Path, entry: str, message: str) -> None:
    text = problems(tmp_path, f"network:\n  allow:\n    - {entry}\n")
    assert "microagent.yaml:6:7: network.allow[0]:" in text and message in text, text


def test_allow_duplicates_and_count(tmp_path: Path) -> None:
    text = problems(tmp_path, "network: {allow: [pypi.org, PYPI.org]}\n")
    assert "network.allow[1]: pypi.org is listed twice" in text
    many = ", ".join(f"h{i}.example" for i in range(65))
    assert "must have at most 64 entries" in problems(tmp_path, f"network: {{allow: [{many}]}}\n")
    assert check_allow_entry("Pypi.Org") == "pypi.org"


def test_allow_flag(tmp_path: Path) -> None:
    spec = load(tmp_path, "network: {allow: [pypi.org]}\n")
    out = apply_overrides(spec, Overrides(allow=("PyPI.org", ".pythonhosted.org")))
    assert out.network.allow == ("pypi.org", ".pythonhosted.org")
    with pytest.raises(InvalidInputError, match=r"--allow: allow entry '10\.0\.0\.1' is an IP"):
        apply_overrides(spec, Overrides(allow=("10.0.0.1",)))
    many = tuple(f"h{i}.example" for i in range(64))
    with pytest.raises(InvalidInputError, match="at most 64"):
        apply_overrides(spec, Overrides(allow=many))


# -- the plan ------------------------------------------------------------------------------


def test_credentials_and_allow_enter_the_config_key_only_when_declared(tmp_path: Path) -> None:
    plain = compile_plan(load(tmp_path, ""), IMAGE)
    assert "credentials" not in plain.config_step.inputs
    assert "allow" not in plain.config_step.inputs["network"]
    brokered = compile_plan(load(tmp_path, "credentials: [{name: anthropic}]\n"), IMAGE)
    allowed = compile_plan(load(tmp_path, "network: {allow: [pypi.org]}\n"), IMAGE)
    assert brokered.config_step.inputs["credentials"] == [PRESETS["anthropic"].to_json()]
    assert allowed.config_step.inputs["network"]["allow"] == ["pypi.org"]
    keys = {plain.config_step.key, brokered.config_step.key, allowed.config_step.key}
    assert len(keys) == 3
    assert plain.rootfs_step.key == brokered.rootfs_step.key == allowed.rootfs_step.key
    moved = apply_overrides(
        load(tmp_path, "credentials: [{name: anthropic}]\n"),
        Overrides(credential_upstreams=("anthropic=http://127.0.0.1:9",)),
    )
    assert compile_plan(moved, IMAGE).config_step.key != brokered.config_step.key
