"""Registry credentials stay with the registry they belong to; registry answers are bounded.

A malicious registry (a tiny HTTP server in a thread) answers requests with a 401 whose
``WWW-Authenticate`` names a token service of its choosing, and records every
``Authorization`` header it gets. The user's auth files hold Docker Hub credentials under
every name Docker and podman use. Hosts that are not loopback (``evildocker.io``,
``docker.io.example.com``) reach the server through ``HTTP_PROXY``, as a DNS or network
attacker would; HTTPS goes nowhere, so no test leaves this machine.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from microagent.cli import main
from microagent.oci.endpoints import Endpoint
from microagent.oci.registry import CredentialScope

HUB_SECRET = "hubuser:hunter2-hub-password"
OWN_SECRET = "localuser:this-registry's-own-password"
TOKEN = "evil-token"
HUGE = 64 << 20  # what the server tries to send as one manifest


@dataclass
class Seen:
    host: str
    path: str
    authorization: str


@dataclass
class EvilRegistry:
    """Answers 401 + a Bearer challenge naming ``realm(host)``; hands out tokens; records."""

    port: int = 0
    realm: Callable[[str], str] = lambda host: f"http://{host}/token"
    anonymous_tokens: bool = True
    manifest_bytes: int = 0  # with a token: stream a manifest this big (0: 404)
    announce_length: bool = False  # send its Content-Length (else: until the connection ends)
    seen: list[Seen] = field(default_factory=list)
    written: int = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def secrets_received(self, host: str | None = None) -> list[str]:
        """Every credential that arrived (at ``host``), Basic headers decoded."""
        found = []
        for item in self.seen:
            if host is not None and item.host != host:
                continue
            kind, _, value = item.authorization.partition(" ")
            if kind.lower() == "basic":
                found.append(base64.b64decode(value).decode(errors="replace"))
            elif "password" in item.authorization:
                found.append(item.authorization)
        return found


def _handler(evil: EvilRegistry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)  # absolute when reached as a proxy
            host = url.netloc or self.headers.get("Host", "")
            auth = self.headers.get("Authorization", "")
            evil.seen.append(Seen(host, url.path, auth))
            if url.path == "/token":
                ok = evil.anonymous_tokens or auth.startswith("Basic ")
                self._send(200 if ok else 401, json.dumps({"token": TOKEN}).encode())
            elif auth != f"Bearer {TOKEN}":
                challenge = f'Bearer realm="{evil.realm(host)}",service="evil",scope="x"'
                self._send(401, b"{}", {"WWW-Authenticate": challenge})
            elif evil.manifest_bytes and "/manifests/" in url.path:
                self._stream_manifest()
            else:
                self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')

        def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def _stream_manifest(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            if evil.announce_length:
                self.send_header("Content-Length", str(evil.manifest_bytes))
            self.end_headers()
            self.close_connection = True
            chunk = b" " * (1 << 20)
            try:
                while evil.written < evil.manifest_bytes:
                    self.wfile.write(chunk)
                    evil.written += len(chunk)
            except OSError:
                return

        def log_message(self, *_args: object) -> None:
            return None

    return Handler


@pytest.fixture
def evil() -> Iterator[EvilRegistry]:
    registry = EvilRegistry()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(registry))
    server.daemon_threads = True
    registry.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield registry
    server.shutdown()
    server.server_close()


def _auth(secret: str) -> dict[str, str]:
    return {"auth": base64.b64encode(secret.encode()).decode()}


@dataclass
class Attack:
    """The evil registry, a user logged in to Docker Hub, and the CLI to drive."""

    evil: EvilRegistry
    auth_file: Path
    tmp_path: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]

    def login(self, host: str, secret: str) -> None:
        data = json.loads(self.auth_file.read_text())
        data["auths"][host] = _auth(secret)
        self.auth_file.write_text(json.dumps(data))

    def proxy_plain_http(self) -> None:
        """Plain-HTTP requests to any host reach the evil server; HTTPS is refused."""
        env = self.monkeypatch
        for name in ("http_proxy", "HTTP_PROXY"):
            env.setenv(name, f"http://{self.evil.host}")
        for name in ("https_proxy", "HTTPS_PROXY"):
            env.setenv(name, "http://127.0.0.1:9")
        for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
            env.delenv(name, raising=False)

    def cli_error(self, *argv: str) -> str:
        """Run the CLI; it must fail; its error message."""
        assert main(["--json", *argv]) == 1
        return str(json.loads(self.capsys.readouterr().out)["error"]["message"])

    def pull_and_plan(self, image: str) -> str:
        """``image pull`` and ``plan`` of a spec with ``image:``; both fail; their errors."""
        spec = self.tmp_path / "microagent.yaml"
        spec.write_text(f'name: t\nimage: {image}\nentrypoint: "true"\n')
        return (
            self.cli_error("image", "pull", image) + "\n" + self.cli_error("plan", "-f", str(spec))
        )


@pytest.fixture
def attack(
    evil: EvilRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Attack:
    docker = tmp_path / "docker"
    docker.mkdir()
    hub = {"https://index.docker.io/v1/": _auth(HUB_SECRET), "docker.io": _auth(HUB_SECRET)}
    (docker / "config.json").write_text(json.dumps({"auths": hub}))
    podman = tmp_path / "auth.json"
    podman.write_text(json.dumps({"auths": {"registry-1.docker.io": _auth(HUB_SECRET)}}))
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(podman))
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    return Attack(evil, podman, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("registry", ["evildocker.io", "docker.io.example.com"])
def test_hub_credentials_stay_off_lookalike_hosts(registry: str, attack: Attack) -> None:
    """A spec's ``image:`` on a host that merely contains "docker.io" gets no Hub password,
    even when the user lists it as insecure and its token service is on its own host."""
    attack.proxy_plain_http()
    attack.monkeypatch.setenv("MICROAGENT_INSECURE_REGISTRIES", registry)
    attack.pull_and_plan(f"{registry}/x:1")
    assert any(s.host == registry and s.path == "/token" for s in attack.evil.seen)
    assert attack.evil.secrets_received() == []


@pytest.mark.parametrize(
    ("mirrored", "mirror", "image"),
    [
        ("evildocker.io", "http://{evil}", "evildocker.io/x:1"),  # lookup by the mirror's host
        ("docker.io", "http://{evil}", "busybox:1"),  # a Hub mirror gets no Hub password
        ("ghcr.io", "http://evildocker.io", "ghcr.io/x:1"),  # nor a lookalike mirror host
    ],
)
def test_mirrors_get_no_credentials_of_the_image_registry(
    mirrored: str, mirror: str, image: str, attack: Attack
) -> None:
    """Credentials are looked up under the mirror's host, never under the image's registry:
    the user trusts evildocker.io with its own password, not a mirror standing in for it."""
    evil = attack.evil
    attack.proxy_plain_http()
    if mirrored == "evildocker.io":
        attack.login(mirrored, OWN_SECRET)
    url = mirror.format(evil=evil.host)
    attack.monkeypatch.setenv("MICROAGENT_REGISTRY_MIRRORS", f"{mirrored}={url}")
    attack.monkeypatch.setenv("MICROAGENT_INSECURE_REGISTRIES", "evildocker.io")
    attack.cli_error("image", "pull", image)
    mirror_host = urlsplit(url).netloc
    assert any(s.host == mirror_host and s.path == "/token" for s in evil.seen)
    assert evil.secrets_received(mirror_host) == []
    if mirrored == "evildocker.io":  # after the mirror's 404: the registry itself, over HTTP
        assert set(evil.secrets_received("evildocker.io")) == {OWN_SECRET}
    assert HUB_SECRET not in evil.secrets_received()


def test_loopback_registry_gets_only_its_own_credentials(attack: Attack) -> None:
    """Loopback is plain HTTP: it gets credentials only when the auth file names that exact
    host, and then only at a token service on that same host and port."""
    evil = attack.evil
    attack.pull_and_plan(f"{evil.host}/x:1")
    assert evil.secrets_received() == []  # nobody logged in to it: anonymous
    attack.login(f"localhost:{evil.port}", OWN_SECRET)  # another name is not this host
    attack.pull_and_plan(f"{evil.host}/x:1")
    assert evil.secrets_received() == []
    attack.login(evil.host, OWN_SECRET)
    attack.pull_and_plan(f"{evil.host}/x:1")
    assert set(evil.secrets_received()) == {OWN_SECRET}


def test_credentials_never_go_to_a_token_service_on_another_host(attack: Attack) -> None:
    """The registry names a token service elsewhere (here: the same server as "localhost"):
    the token is asked for anonymously, and the error says why the login was not used."""
    evil = attack.evil
    attack.login(evil.host, OWN_SECRET)
    evil.realm = lambda _host: f"http://localhost:{evil.port}/token"
    evil.anonymous_tokens = False
    messages = attack.pull_and_plan(f"{evil.host}/x:1")
    assert any(s.host == f"localhost:{evil.port}" and s.path == "/token" for s in evil.seen)
    assert evil.secrets_received() == []
    assert "credentials were not sent to the token service" in messages


HUB = Endpoint("registry-1.docker.io", "https")
GHCR = Endpoint("ghcr.io", "https")
LOOKALIKE = Endpoint("evildocker.io", "http")


@pytest.mark.parametrize(
    ("scope", "realm", "allowed"),
    [
        (CredentialScope(HUB), "https://auth.docker.io/token", True),
        (CredentialScope(HUB), "http://auth.docker.io/token", False),
        (CredentialScope(HUB), "https://registry-1.docker.io/token", True),
        (CredentialScope(GHCR), "https://ghcr.io/token", True),
        (CredentialScope(GHCR), "https://GHCR.io:443/token", True),
        (CredentialScope(GHCR), "https://ghcr.io:8443/token", False),
        (CredentialScope(GHCR), "http://ghcr.io/token", False),  # not insecure: no plain HTTP
        (CredentialScope(GHCR), "https://auth.docker.io/token", False),
        (CredentialScope(GHCR), "https://ghcr.io.evil.example/token", False),
        (CredentialScope(GHCR), "https://ghcr.io@evil.example/token", False),
        (CredentialScope(GHCR), "https://evil.example@ghcr.io/token", False),
        (CredentialScope(GHCR), "ftp://ghcr.io/token", False),
        (CredentialScope(GHCR), "ghcr.io/token", False),
        (CredentialScope(LOOKALIKE, plain_http=True), "http://evildocker.io/token", True),
        (CredentialScope(LOOKALIKE, plain_http=True), "https://auth.docker.io/token", False),
        (CredentialScope(LOOKALIKE), "http://evildocker.io/token", False),
    ],
)
def test_credential_scope(scope: CredentialScope, realm: str, allowed: bool) -> None:
    assert scope.allows(realm) is allowed


def test_oversized_manifest_is_refused_without_reading_it(attack: Attack) -> None:
    """A registry streaming an endless manifest: the client stops after 4 MiB and refuses."""
    attack.evil.manifest_bytes = HUGE
    message = attack.cli_error("image", "pull", f"{attack.evil.host}/x:1")
    assert "larger than 4 MiB" in message
    assert attack.evil.written < HUGE // 2


def test_manifest_announced_too_big_is_refused_before_reading(attack: Attack) -> None:
    """A Content-Length over 4 MiB is refused on the header, before the body is read."""
    attack.evil.manifest_bytes = HUGE
    attack.evil.announce_length = True
    message = attack.cli_error("image", "pull", f"{attack.evil.host}/x:1")
    assert f"larger than 4 MiB ({HUGE} bytes announced)" in message
    assert attack.evil.written < HUGE // 2
