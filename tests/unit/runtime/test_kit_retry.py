"""Guest-kit downloads over HTTP ride out transient faults (a reset connection, a 5xx or 429
answer, a body cut short) with bounded retries, each said on the progress output; a 404 and
wrong bytes fail at once, without a retry. A local HTTP server in a thread serves a signed
test mirror and plays the faults; the back-off is made tiny, never slept in full."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from runtime_kit import make_mirror, mirror_of

from microagent.errors import BuildError, IntegrityError
from microagent.kit import debian, guestkit
from microagent.store.content import Store

FAST = debian.Retry(backoff=0.001, max_pause=0.05)
INDEX = "/dists/bookworm/main/binary-amd64/Packages.xz"
RELEASE = "/dists/bookworm/InRelease"
BUSYBOX = "/pool/main/busybox.deb"


class Mirror:
    """A mirror's files over HTTP; ``faults[path]`` lists what the next requests of that path
    get instead of the file (``reset``, ``truncate``, ``wrong``, or an HTTP status such as
    ``500`` or ``429:0`` with its Retry-After); ``hits`` counts every request."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.faults: dict[str, list[str]] = {}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()

    def next_fault(self, path: str) -> str:
        with self.lock:
            self.hits[path] += 1
            queue = self.faults.get(path) or []
            return queue.pop(0) if queue else ""


def handler_for(mirror: Mirror) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: object) -> None:
            return None

        def do_GET(self) -> None:
            fault = mirror.next_fault(self.path)
            file = mirror.root / self.path.lstrip("/")
            if fault == "reset":  # an RST instead of an answer
                linger = struct.pack("ii", 1, 0)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                self.connection.close()
                self.close_connection = True
                return
            if fault[:1].isdigit():
                status, _, after = fault.partition(":")
                self.send_response(int(status))
                if after:
                    self.send_header("Retry-After", after)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if not file.is_file():
                self.send_error(404)
                return
            data = file.read_bytes()
            if fault == "wrong":
                data = bytes(b ^ 0xFF for b in data)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2] if fault == "truncate" else data)
            self.close_connection = True

    return Handler


class Server(ThreadingHTTPServer):
    def handle_error(self, *_args: object) -> None:
        return None  # a reset played on purpose is no error to print


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Mirror, debian.Mirror]]:
    root = make_mirror(tmp_path / "mirror", busybox=b"BUSYBOX" * 5000)
    mirror = Mirror(root)
    server = Server(("127.0.0.1", 0), handler_for(mirror))
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        yield mirror, debian.Mirror(url=url, keyring=mirror_of(root).keyring)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def retries(said: list[str]) -> list[str]:
    return [line for line in said if "retrying in" in line]


def test_transient_faults_are_retried_and_the_kit_is_made(
    served: tuple[Mirror, debian.Mirror], tmp_path: Path
) -> None:
    server, mirror = served
    server.faults = {
        RELEASE: ["reset", "503"],
        INDEX: ["500"],
        BUSYBOX: ["truncate", "429:0"],
    }
    said: list[str] = []
    store = Store(tmp_path / "store")
    kit = guestkit.install_kit(store, mirror, arch="amd64", progress=said.append, retry=FAST)
    assert kit.kernel.is_file()
    assert (server.hits[RELEASE], server.hits[INDEX], server.hits[BUSYBOX]) == (3, 2, 3)
    lines = retries(said)
    assert len(lines) == 5, said
    first = lines[0]
    assert first.startswith(f"download of {mirror.release_url()} failed: ")
    assert first.endswith("(attempt 2/4)")
    assert "HTTP 503" in lines[1] and lines[1].endswith("(attempt 3/4)")
    assert lines[2].startswith(f"download of {mirror.index_url('amd64')} failed: HTTP 500")
    size = (server.root / BUSYBOX.lstrip("/")).stat().st_size
    assert f"the connection closed {size - size // 2} bytes early" in lines[3]
    assert lines[4].endswith("HTTP 429 Too Many Requests; retrying in 0 s (attempt 3/4)")
    index = debian.fetch_index(mirror, "amd64", retry=FAST)
    blob = store.blob_path(index["busybox-static"].digest)
    assert blob.read_bytes() == (server.root / BUSYBOX.lstrip("/")).read_bytes()
    leftovers = [p.name for p in blob.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], "the broken tries left nothing behind"


def test_a_fault_that_persists_gives_up_after_the_attempts(
    served: tuple[Mirror, debian.Mirror],
) -> None:
    server, mirror = served
    server.faults = {RELEASE: ["502"] * 10}
    said: list[str] = []
    with pytest.raises(BuildError) as raised:
        debian.fetch_index(mirror, "amd64", retry=FAST, say=said.append)
    assert raised.value.message == (
        f"cannot download {mirror.release_url()}: HTTP 502 Bad Gateway (gave up after 4 tries)"
    )
    assert server.hits[RELEASE] == 4 and len(retries(said)) == 3


def test_a_long_retry_after_is_not_waited_for(served: tuple[Mirror, debian.Mirror]) -> None:
    server, mirror = served
    server.faults = {RELEASE: ["503:3600"]}
    with pytest.raises(BuildError, match="the mirror asks to retry after 3600 s") as raised:
        debian.fetch_index(mirror, "amd64", retry=FAST)
    assert "try again later" in raised.value.hint
    assert server.hits[RELEASE] == 1


def test_not_found_is_not_retried(served: tuple[Mirror, debian.Mirror]) -> None:
    server, mirror = served
    missing = debian.Mirror(url=mirror.url, suite="nosuch", keyring=mirror.keyring)
    said: list[str] = []
    with pytest.raises(BuildError) as raised:
        debian.fetch_index(missing, "amd64", retry=FAST, say=said.append)
    url = missing.release_url()
    assert raised.value.message == f"cannot download {url}: HTTP 404 Not Found"
    assert "MICROAGENT_DEBIAN_MIRROR" in raised.value.hint
    assert server.hits["/dists/nosuch/InRelease"] == 1 and retries(said) == []


@pytest.mark.parametrize("path", [INDEX, BUSYBOX])
def test_wrong_bytes_are_an_integrity_failure_without_a_retry(
    served: tuple[Mirror, debian.Mirror], tmp_path: Path, path: str
) -> None:
    server, mirror = served
    server.faults = {path: ["wrong"]}
    store = Store(tmp_path / "store")
    said: list[str] = []
    with pytest.raises(IntegrityError) as raised:
        guestkit.install_kit(store, mirror, arch="amd64", progress=said.append, retry=FAST)
    assert raised.value.message.startswith(f"{mirror.url}{path}")
    assert server.hits[path] == 1 and retries(said) == []
    with contextlib.suppress(FileNotFoundError):
        assert not [p for p in (store.root / "blobs/sha256").iterdir() if p.name[0] == "."]


def test_a_refused_connection_is_retried_then_reported(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on (bound, then closed)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mirror = debian.Mirror(url=f"http://127.0.0.1:{port}", keyring=tmp_path / "k.gpg")
    said: list[str] = []
    with pytest.raises(BuildError, match=r"refused.*\(gave up after 2 tries\)"):
        debian.fetch_release(mirror, retry=debian.Retry(attempts=2, backoff=0.001), say=said.append)
    assert len(retries(said)) == 1 and "(attempt 2/2)" in said[0]


@pytest.mark.parametrize(
    ("header", "pause"),
    [("0.01", "0.01"), ("0", "0"), ("Wed, 21 Oct 2015 07:28:00 GMT", "0"), ("nan", None),
     ("-1", None), ("soon", None), ("9" * 1000, None)],
)  # fmt: skip
def test_a_short_or_unreadable_retry_after_is_retried(
    served: tuple[Mirror, debian.Mirror], header: str, pause: str | None
) -> None:
    """A Retry-After within the cap (fractions and dates too) is waited for as asked; an
    unreadable one (shared parser: tests/unit/test_backoff.py) leaves the usual back-off."""
    server, mirror = served
    server.faults = {RELEASE: [f"503:{header}"]}
    said: list[str] = []
    debian.fetch_release(mirror, retry=FAST, say=said.append)
    assert server.hits[RELEASE] == 2 and len(retries(said)) == 1, said
    if pause is not None:
        assert said[0].endswith(
            f"HTTP 503 Service Unavailable; retrying in {pause} s (attempt 2/4)"
        )


def test_a_huge_retry_after_is_bounded_and_not_waited_for(
    served: tuple[Mirror, debian.Mirror],
) -> None:
    server, mirror = served
    server.faults = {RELEASE: ["429:" + "9" * 40]}
    with pytest.raises(BuildError, match=r"the mirror asks to retry after 1e\+09 s"):
        debian.fetch_release(mirror, retry=FAST)
    assert server.hits[RELEASE] == 1


def test_the_default_kit_retry_keeps_its_own_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random, "uniform", lambda _a, b: b)  # no jitter
    retry = debian.Retry()
    assert (retry.attempts, retry.backoff, retry.max_pause) == (4, 0.5, 8.0)
    assert [retry.pause(n) for n in range(1, 5)] == [0.5, 1.0, 2.0, None]
    assert retry.pause(1, retry_after=8.0) == 8.0 and retry.pause(1, retry_after=8.5) is None
