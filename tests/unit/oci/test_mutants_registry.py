"""The registry client's guards, pinned down where mutants of oci/registry.py outlived the
registry tests (docs/testing.md): which credentials go where, what a URL in a message may
show, and what a registry's answer must match. These are the client's own small functions,
called directly: the integration tests drive the same code through a real registry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from microagent.errors import IntegrityError, RegistryError
from microagent.oci import registry
from microagent.oci.endpoints import Endpoint
from microagent.oci.registry import CredentialScope, read_auths

REG = Endpoint("reg.example", "https")


def test_auth_files_are_read_leniently_and_the_first_wins(tmp_path: Path) -> None:
    files = []
    for i, content in enumerate(
        [
            "{not json",
            "[1, 2]",
            '{"auths": null}',
            '{"auths": []}',
            json.dumps(
                {
                    "auths": {
                        "junk": "a string, not an entry",
                        "nothing": {"auth": 7},
                        "https://Index.Docker.io/v1/": {"auth": "HUB"},
                        "reg.example:5000/some/path": {"auth": "PORT"},
                        "https://odd://host/x": {"auth": "ODD"},
                        "with space/x": {"auth": "SPACE"},
                    }
                }
            ),
            json.dumps(
                {"auths": {"index.docker.io": {"auth": "LATER"}, "b.example": {"auth": "B"}}}
            ),
        ]
    ):
        path = tmp_path / f"config{i}.json"
        path.write_text(content)
        files.append(path)
    assert read_auths([tmp_path / "missing.json", *files]) == {
        "index.docker.io": "HUB",
        "reg.example:5000": "PORT",
        "odd:": "ODD",
        "with space": "SPACE",
        "b.example": "B",
    }


def test_docker_hub_credentials_answer_to_any_of_its_names() -> None:
    assert registry._credentials("docker.io", {"index.docker.io": "A"}) == "A"
    assert registry._credentials("Registry-1.Docker.io", {"docker.io": "B"}) == "B"
    assert registry._credentials("reg.example", {"docker.io": "B"}) is None


def test_authorities_default_their_port_by_scheme() -> None:
    assert registry._authority("http", "Reg.Example") == ("reg.example", 80)
    assert registry._authority("https", "reg.example") == ("reg.example", 443)
    assert registry._authority("https", "reg.example:5000") == ("reg.example", 5000)
    assert registry._authority("https", "") is None
    assert registry._authority("https", "u@reg.example") is None
    assert registry._authority("ftp", "reg.example") is None


def test_credentials_never_go_to_a_realm_that_does_not_parse() -> None:
    scope = CredentialScope(REG)
    assert scope.allows("https://reg.example/token") is True
    assert scope.allows("https://[reg.example/token") is False


def test_bearer_challenges_are_read_whatever_the_case() -> None:
    header = 'Bearer Realm="https://auth.example/token",Service="reg example",scope="a:b"'
    assert registry._bearer_challenge(header) == {
        "realm": "https://auth.example/token",
        "service": "reg example",
        "scope": "a:b",
    }
    assert registry._bearer_challenge('Basic realm="x"') == {}


def test_sizes_in_messages() -> None:
    assert registry._size(1 << 20) == "1 MiB"
    assert registry._size((1 << 20) - 1) == "1048575 bytes"
    assert registry._size(3 << 20) == "3 MiB"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@reg.example/v2/x?_state=secret", "https://reg.example/v2/x"),
        ("https://reg.example/v2/a@b/x?y=1?z=2", "https://reg.example/v2/a@b/x"),
        ("https://u@v@reg.example/p", "https://reg.example/p"),
        ("https://reg.example/r?next=http://x", "https://reg.example/r"),
        ("http://reg.example:5000/v2/", "http://reg.example:5000/v2/"),
    ],
)
def test_urls_in_messages_show_no_userinfo_and_no_query(url: str, shown: str) -> None:
    assert registry._redacted(url) == shown


class _Response:
    def __init__(self, status: int, headers: dict[str, str], body: Any = None) -> None:
        self.status_code = status
        self.headers = headers
        self.reason = "Reason"
        self._body = body

    def json(self) -> Any:
        if self._body is None:
            raise ValueError("no body")
        return self._body


def test_an_upload_location_must_be_given_and_is_made_absolute() -> None:
    assert registry._location(_Response(202, {"Location": "/v2/u/1"}), REG, "x") == (
        "https://reg.example/v2/u/1"
    )
    assert registry._location(_Response(202, {"Location": "https://o/u"}), REG, "x") == (
        "https://o/u"
    )
    with pytest.raises(RegistryError) as raised:
        registry._location(_Response(202, {}), REG, "pushing blob")
    assert raised.value.message == "pushing blob: the registry gave no upload location"
    assert raised.value.hint == registry.REFUSED_HINT
    with pytest.raises(RegistryError) as raised:
        registry._location(
            _Response(400, {}, {"errors": [{"message": "name invalid"}]}), REG, "pushing blob"
        )
    assert raised.value.message == "pushing blob: HTTP 400 Reason: name invalid"


def test_a_stored_digest_the_registry_disputes_is_refused() -> None:
    registry._check_digest_header({"Docker-Content-Digest": "sha256:a"}, "sha256:a", "x")
    registry._check_digest_header({}, "sha256:a", "x")
    with pytest.raises(IntegrityError) as raised:
        registry._check_digest_header(
            {"Docker-Content-Digest": "sha256:b"}, "sha256:a", "pushing manifest"
        )
    assert (
        raised.value.message == "pushing manifest: the registry stored sha256:b, expected sha256:a"
    )
    assert raised.value.hint == registry.WRONG_CONTENT_HINT


def test_a_manifest_must_match_its_digest_and_the_registry_header() -> None:
    data = b'{"schemaVersion": 2}'
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    fetched = registry._verified(
        data, digest, {"Content-Type": "application/json; charset=utf-8"}, REG
    )
    assert (fetched.data, fetched.digest, fetched.media_type, fetched.where) == (
        data,
        digest,
        "application/json",
        "https://reg.example",
    )
    assert registry._verified(data, "latest", {}, REG).media_type == ""
    other = "sha256:" + "0" * 64
    with pytest.raises(IntegrityError) as raised:
        registry._verified(data, other, {}, REG)
    assert raised.value.message == (
        f"manifest from https://reg.example does not match {other} (got {digest})"
    )
    assert raised.value.hint == registry.WRONG_CONTENT_HINT
    with pytest.raises(IntegrityError) as raised:
        registry._verified(data, "latest", {"Docker-Content-Digest": other}, REG)
    assert raised.value.message == (
        f"manifest from https://reg.example: header says {other}, content is {digest}"
    )
    assert raised.value.hint == registry.WRONG_CONTENT_HINT
