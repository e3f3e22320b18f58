"""Registry retries and timeouts users can set and see: the ``registry.*`` settings (config
file) and their ``MICROAGENT_REGISTRY_*`` variables, checked where they are written; the
policy the client builds from them, honoured against real local servers; one stderr line per
retry, also with ``--json`` (whose stdout stays one document). The tests that need the local
registry (behind ``testenv.faultproxy``) are marked ``integration``."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent.cli import main
from microagent.compiler.refs import ImageRef
from microagent.digests import sha256_digest
from microagent.errors import ConfigError, InvalidInputError, RegistryError
from microagent.oci import documents as oci
from microagent.oci.endpoints import RegistryConfig
from microagent.oci.registry import RegistryClient, RetryPolicy
from microagent.settings import Settings, explain
from testenv import standin
from testenv.faultproxy import Fault, FaultProxy
from testenv.registry import RegistryHandle

ATTEMPTS = "MICROAGENT_REGISTRY_ATTEMPTS"
DEADLINE = "MICROAGENT_REGISTRY_DEADLINE"
CONNECT = "MICROAGENT_REGISTRY_CONNECT_TIMEOUT"
READ = "MICROAGENT_REGISTRY_READ_TIMEOUT"
REPO = "retry/settings"
BLOB_SIZE = 64 << 10
WHOLE = "must be a whole number from 1 to 20"
SECONDS = "must be a number of seconds, more than 0 and at most 3600"
LINE = re.compile(
    r"^registry 127\.0\.0\.1:\d+: (?P<cause>.+); (?P<verb>retrying|resuming) in "
    r"(?P<pause>[\d.e-]+) s \(attempt (?P<n>\d+)/(?P<of>\d+)\)$"
)


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An (empty) user config at MICROAGENT_CONFIG; no registry variable set."""
    path = tmp_path / "config.yaml"
    monkeypatch.setenv("MICROAGENT_CONFIG", str(path))
    monkeypatch.setenv("MICROAGENT_HOME", str(tmp_path / "home"))
    for name in (ATTEMPTS, DEADLINE, CONNECT, READ):
        monkeypatch.delenv(name, raising=False)
    return path


def settings_from(env: dict[str, str], config: Path) -> Settings:
    return Settings.from_environ({"MICROAGENT_CONFIG": str(config), **env}, home=config.parent)


# -- parsing: environment, config file, precedence ---------------------------------------------


def test_unset_they_are_the_policy_defaults(config_file: Path) -> None:
    settings = settings_from({}, config_file)
    policy = RetryPolicy.of(settings)
    assert policy == RetryPolicy()
    assert (policy.attempts, policy.deadline, policy.timeout) == (4, 120.0, (5.0, 60.0))


def test_the_environment_sets_each_one(config_file: Path) -> None:
    env = {ATTEMPTS: "7", DEADLINE: "30.5", CONNECT: " 2.5 ", READ: "0.25"}
    policy = RetryPolicy.of(settings_from(env, config_file))
    assert (policy.attempts, policy.deadline, policy.timeout) == (7, 30.5, (2.5, 0.25))
    assert isinstance(policy.attempts, int)
    assert policy.backoff == RetryPolicy().backoff  # what has no setting keeps its default


def test_the_config_file_sets_them_and_a_variable_wins(config_file: Path) -> None:
    config_file.write_text(
        "registry:\n  attempts: 2\n  deadline: 30\n  connectTimeout: 1.5\n  readTimeout: 0x10\n"
    )
    settings = settings_from({ATTEMPTS: "6", DEADLINE: ""}, config_file)  # empty: unset
    assert settings.registry_attempts == 6
    assert settings.registry_deadline == 30.0
    assert (settings.registry_connect_timeout, settings.registry_read_timeout) == (1.5, 16.0)


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        (ATTEMPTS, "0", WHOLE),
        (ATTEMPTS, "21", WHOLE),
        (ATTEMPTS, "2.5", WHOLE),
        (ATTEMPTS, "many", WHOLE),
        (ATTEMPTS, "nan", WHOLE),
        (DEADLINE, "0", SECONDS),
        (DEADLINE, "-5", SECONDS),
        (DEADLINE, "3601", SECONDS),
        (CONNECT, "inf", SECONDS),
        (CONNECT, "5s", SECONDS),
        (READ, "1e9", SECONDS),
    ],
)
def test_a_bad_variable_is_named_with_its_value_and_a_hint(
    config_file: Path, var: str, value: str, says: str
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        settings_from({var: value}, config_file)
    assert caught.value.message == f"{var}={value!r}: {says}"
    assert caught.value.hint.endswith("or unset it for the default")
    assert caught.value.exit_code == 2


def test_bad_values_in_the_file_are_each_located(config_file: Path) -> None:
    config_file.write_text(
        "registry:\n"
        "  attempts: 0\n"
        "  deadline: '30'\n"
        "  connectTimeout: .inf\n"
        "  readTimeout: true\n"
        "  attemps: 3\n"
        "  docker.io: {mirrors: [http://127.0.0.1:5000]}\n"
    )
    with pytest.raises(ConfigError) as caught:
        settings_from({}, config_file)
    got = [(d.headline(), d.hint) for d in caught.value.diagnostics]
    assert got == [
        (f"{config_file}:2:13: registry.attempts: must be a whole number from 1 to 20",
         "e.g. 4 (1: no retries)"),
        (f"{config_file}:3:13: registry.deadline: must be a number", "seconds, e.g. 120"),
        (f"{config_file}:4:19: registry.connectTimeout: must be a number of seconds, more "
         "than 0 and at most 3600", "seconds, e.g. 5"),
        (f"{config_file}:5:16: registry.readTimeout: must be a number", "seconds, e.g. 60"),
        (f"{config_file}:6:3: registry.attemps: unknown setting",
         "did you mean 'attempts'? (known here: attempts, deadline, connectTimeout, "
         "readTimeout)"),
        (f"{config_file}:7:3: registry.docker.io: unknown setting",
         "registry hosts go under `registries:` (known here: attempts, deadline, "
         "connectTimeout, readTimeout)"),
    ]  # fmt: skip


def test_a_bad_variable_stops_the_cli_with_exit_2(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(ATTEMPTS, "0")
    capsys.readouterr()
    assert main(["config", "show"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ATTEMPTS}='0': must be a whole number from 1 to 20\n")
    assert "hint: e.g. 4 (1: no retries); or unset it for the default" in err


# -- config show -------------------------------------------------------------------------------


def test_config_show_lists_each_with_where_it_came_from(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file.write_text("registry:\n  attempts: 2\n  readTimeout: 15\n")
    monkeypatch.setenv(DEADLINE, "45")
    capsys.readouterr()
    assert main(["--json", "config", "show"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["settings"]}
    assert rows["registry.attempts"] == {
        "name": "registry.attempts",
        "value": 2,
        "source": "config file",
        "origin": f"{config_file}:2:13",
        "env": ATTEMPTS,
    }
    assert rows["registry.readTimeout"]["value"] == 15.0
    assert rows["registry.deadline"] == {
        "name": "registry.deadline",
        "value": 45.0,
        "source": "environment",
        "origin": DEADLINE,
        "env": DEADLINE,
    }
    assert rows["registry.connectTimeout"] == {
        "name": "registry.connectTimeout",
        "value": 5.0,
        "source": "default",
        "origin": "",
        "env": CONNECT,
    }
    assert main(["config", "show"]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"^registry\.attempts +2 +config file \({config_file}:2:13\)$", text, re.M)
    assert re.search(rf"^registry\.deadline +45\.0 +environment \({DEADLINE}\)$", text, re.M)
    assert re.search(r"^registry\.connectTimeout +5\.0 +default$", text, re.M)


def test_explain_and_the_settings_agree(config_file: Path) -> None:
    config_file.write_text("registry:\n  connectTimeout: 3\n")
    settings, rows = explain({"MICROAGENT_CONFIG": str(config_file), READ: "9"})
    shown = {row.name: row.value for row in rows}
    assert shown["registry.connectTimeout"] == settings.registry_connect_timeout == 3.0
    assert shown["registry.readTimeout"] == settings.registry_read_timeout == 9.0


# -- the policy reaches the transport: a server that never answers -----------------------------


class Silent:
    """A TCP server on loopback that takes connections and reads requests, never answering."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self.held.append(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


@pytest.fixture
def silent() -> Iterator[Silent]:
    server = Silent()
    try:
        yield server
    finally:
        server.close()


def test_the_read_timeout_and_attempts_set_reach_the_transport(
    silent: Silent, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path, registry_attempts=2, registry_read_timeout=0.3)
    lines: list[str] = []
    client = RegistryClient.from_settings(settings, notify=lines.append)
    began = time.monotonic()
    with pytest.raises(RegistryError) as caught:
        client.manifest(ImageRef(silent.host, REPO), "v1")
    elapsed = time.monotonic() - began
    assert "timed out (gave up after 2 tries)" in caught.value.message
    assert silent.connections == 2
    assert elapsed < 5.0  # two 0.3 s reads and one pause of at most 0.5 s (not 60 s reads)
    (line,) = lines
    found = LINE.match(line)
    assert found, line
    assert (found["cause"], found["n"], found["of"]) == ("timed out", "2", "2")


class SlowSink:
    """A loopback HTTP server that takes blob uploads (POST, PATCH, PUT) and reads bodies
    slowly, through a small receive buffer: a slow uplink."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 10)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.received = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while (request := self._request(conn)) is not None:
                conn.sendall(request)

    def _request(self, conn: socket.socket) -> bytes | None:
        """Read one request (its body slowly); the answer to send, None when closed."""
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            byte = conn.recv(1)
            if not byte:
                return None
            head += byte
        method = head.split(b" ", 1)[0]
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        left = int(length[1]) if length else 0
        while left:
            piece = conn.recv(min(left, 16 << 10))
            if not piece:
                return None
            left -= len(piece)
            self.received += len(piece)
            time.sleep(0.001)
        if method == b"HEAD":
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        if method in (b"POST", b"PATCH"):
            where = b"Location: /v2/up/blobs/uploads/1\r\n"
            return b"HTTP/1.1 202 Accepted\r\n" + where + b"Content-Length: 0\r\n\r\n"
        return b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"

    def close(self) -> None:
        self.listener.close()


def test_a_chunked_upload_to_a_slow_registry_is_not_cut_by_the_timeout(tmp_path: Path) -> None:
    """Each PATCH chunk is sent in pieces, each within the timeout: sent as one bytes object,
    the whole 8 MiB chunk had to go within 0.1 s here (64 MiB within 5 s by default)."""
    sink = SlowSink()
    data = bytes(8 << 20) + b"!"
    (tmp_path / "blob").write_bytes(data)
    settings = Settings(home=tmp_path, registry_attempts=1, registry_connect_timeout=0.1)
    client = RegistryClient.from_settings(settings)
    try:
        sent = client.push_blob(
            ImageRef(sink.host, "up"), sha256_digest(data), len(data), tmp_path / "blob",
            chunk_size=8 << 20,
        )  # fmt: skip
    finally:
        sink.close()
    assert sent and sink.received == len(data)


# -- against a real registry behind a fault proxy ----------------------------------------------


def _push(client: RegistryClient, ref: ImageRef, folder: Path, data: bytes) -> str:
    digest = sha256_digest(data)
    (folder / "blob").write_bytes(data)
    client.push_blob(ref, digest, len(data), folder / "blob")
    return digest


@pytest.fixture(scope="module")
def pushed(registry: RegistryHandle, tmp_path_factory: pytest.TempPathFactory) -> str:
    """REPO:v1 in the registry (a config and one random 64 KiB blob); the blob's digest."""
    folder = tmp_path_factory.mktemp("pushed")
    client = RegistryClient()
    ref = ImageRef(registry.host, REPO)
    blob = _push(client, ref, folder, bytes(range(256)) * (BLOB_SIZE // 256))
    config = b'{"rootfs": {"type": "layers", "diff_ids": []}}'
    config_digest = _push(client, ref, folder, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": oci.OCI_LAYER_TAR, "digest": blob, "size": BLOB_SIZE}],
    }).encode()  # fmt: skip
    client.push_manifest(ref, "v1", manifest, oci.OCI_MANIFEST)
    return blob


def client_for(attempts: int, lines: list[str], tmp_path: Path) -> RegistryClient:
    settings = Settings(home=tmp_path, registry_attempts=attempts)
    return RegistryClient.from_settings(settings, notify=lines.append)


@pytest.mark.integration
def test_each_retry_is_one_line_saying_why_where_and_which_attempt(
    pushed: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    fault_proxy.inject(Fault.error(503, retry_after="0.05"), "/manifests/", times=2)
    lines: list[str] = []
    found = client_for(4, lines, tmp_path).manifest(ImageRef(fault_proxy.host, REPO), "v1")
    assert found.kind() == oci.OCI_MANIFEST
    assert lines == [
        f"registry {fault_proxy.host}: HTTP 503 Service Unavailable; retrying in 0.05 s "
        f"(attempt {n}/4)"
        for n in (2, 3)
    ]


@pytest.mark.integration
def test_a_broken_blob_download_says_where_it_resumes(
    pushed: str, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    fault_proxy.inject(Fault.reset(after=4096), f"/blobs/{pushed}", times=1)
    lines: list[str] = []
    client = client_for(4, lines, tmp_path)
    with client.blob(ImageRef(fault_proxy.host, REPO), pushed) as stream:
        assert sha256_digest(stream.read()) == pushed
    (line,) = lines
    found = LINE.match(line)
    assert found, line
    assert found["cause"] == "the download broke at byte 4096 (connection reset by peer)"
    assert (found["verb"], found["n"], found["of"]) == ("resuming", "2", "4")


@pytest.mark.integration
def test_a_failing_mirror_says_what_is_tried_next(
    pushed: str, failing_mirror: FaultProxy, registry: RegistryHandle, tmp_path: Path
) -> None:
    config = RegistryConfig(mirrors={registry.host: (failing_mirror.url,)})
    lines: list[str] = []
    client = RegistryClient(config, notify=lines.append)
    ref = ImageRef(registry.host, REPO)
    assert client.manifest(ref, "v1").kind() == oci.OCI_MANIFEST
    with client.blob(ref, pushed) as stream:
        assert sha256_digest(stream.read()) == pushed
    mirror, origin = failing_mirror.url, f"http://{registry.host}"
    assert lines == [
        f"registry {failing_mirror.host}: GET {mirror}/v2/{REPO}/{path}: HTTP 503 Service "
        f"Unavailable (1 try allowed); trying {origin}"
        for path in ("manifests/v1", f"blobs/{pushed}")
    ]
    assert len(failing_mirror.log) == 2  # a mirror gets one try: the next endpoint is its retry


@pytest.mark.integration
@pytest.mark.parametrize("attempts", [1, 3])
def test_the_attempts_set_are_the_tries_made(
    pushed: str, fault_proxy: FaultProxy, tmp_path: Path, attempts: int
) -> None:
    fault_proxy.inject(Fault.error(503, retry_after="0"), "/manifests/", times=None)
    lines: list[str] = []
    with pytest.raises(RegistryError) as caught:
        client_for(attempts, lines, tmp_path).manifest(ImageRef(fault_proxy.host, REPO), "v1")
    assert len(fault_proxy.seen("/manifests/")) == attempts
    assert len(lines) == attempts - 1
    tried = "(1 try allowed)" if attempts == 1 else f"(gave up after {attempts} tries)"
    assert f"HTTP 503 Service Unavailable {tried}" in caught.value.message


# -- the CLI: image pull -----------------------------------------------------------------------


def _pull(
    capsys: pytest.CaptureFixture[str], ref: str, *, json_mode: bool = True
) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([*(["--json"] if json_mode else []), "image", "pull", ref])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.integration
def test_cli_pull_with_one_attempt_fails_after_one_try_with_a_clear_error(
    pushed: str,
    fault_proxy: FaultProxy,
    config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(ATTEMPTS, "1")
    fault_proxy.inject(Fault.error(503), "/manifests/", times=None)
    code, out, err = _pull(capsys, f"{fault_proxy.host}/{REPO}:v1")
    error: dict[str, Any] = json.loads(out)["error"]
    assert (code, error["kind"]) == (1, "registry")
    assert error["message"].endswith("HTTP 503 Service Unavailable (1 try allowed)")
    assert "running the command again is safe" in error["hint"]
    assert "config show" in error["hint"]
    assert len(fault_proxy.seen("/manifests/")) == 1
    assert err == ""  # no retry, so no retry line

    code, out, err = _pull(capsys, f"{fault_proxy.host}/{REPO}:v1", json_mode=False)
    assert code == 1 and len(fault_proxy.seen("/manifests/")) == 2
    assert err.startswith("error: cannot fetch ") and "(1 try allowed)\nhint: " in err
    assert "Traceback" not in err


@pytest.mark.integration
def test_cli_pull_shows_retries_on_stderr_and_keeps_json_on_stdout(
    busybox_image: standin.PushedImage,
    fault_proxy: FaultProxy,
    config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(ATTEMPTS, "3")
    fault_proxy.inject(Fault.error(503, retry_after="0.05"), "/manifests/", times=2)
    ref = f"{fault_proxy.host}/{busybox_image.repository}:{busybox_image.tag}"
    code, out, err = _pull(capsys, ref)
    assert code == 0, out + err
    assert json.loads(out)["digest"] == busybox_image.digest  # stdout: the one document
    assert err.splitlines() == [
        f"registry {fault_proxy.host}: HTTP 503 Service Unavailable; retrying in 0.05 s "
        f"(attempt {n}/3)"
        for n in (2, 3)
    ]
