"""The registry client against a registry that misbehaves on purpose (``testenv.faultproxy`` in
front of the real local one): transient faults are retried or resumed, the rest fail clearly,
and a wrong byte is never accepted or stored."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from microagent.compiler.refs import ImageRef
from microagent.errors import IntegrityError, RegistryError
from microagent.oci import documents as oci
from microagent.oci.endpoints import RegistryConfig
from microagent.oci.registry import RegistryClient, RetryPolicy
from microagent.store.content import Store
from testenv.faultproxy import Fault, FaultProxy
from testenv.registry import RegistryHandle

pytestmark = pytest.mark.integration

# Sub-second everything: back-off 10-20 ms, a stall is 0.3 s without a byte.
FAST = RetryPolicy(
    attempts=4, backoff=0.02, max_pause=0.5, deadline=10.0, connect_timeout=2.0,
    read_timeout=0.3, min_rate=1,
)  # fmt: skip
REPO = "faults/img"
LAYER_SIZE = 300_000


@dataclass(frozen=True)
class Pushed:
    manifest: bytes
    digest: str  # of the manifest
    layer: bytes
    layer_digest: str


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def image(registry: RegistryHandle, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    """A one-layer image (random bytes, so a flipped byte always shows) as REPO:v1."""
    folder = tmp_path_factory.mktemp("image")
    layer = random.Random(20).randbytes(LAYER_SIZE)
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [_sha(layer)]}}).encode()
    client = RegistryClient()
    ref = ImageRef(registry.host, REPO)
    for data in (layer, config):
        (folder / "blob").write_bytes(data)
        client.push_blob(ref, _sha(data), len(data), folder / "blob")
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": _sha(config), "size": len(config)},
        "layers": [{"mediaType": oci.OCI_LAYER_TAR, "digest": _sha(layer), "size": len(layer)}],
    }).encode()  # fmt: skip
    client.push_manifest(ref, "v1", manifest, oci.OCI_MANIFEST)
    return Pushed(manifest, _sha(manifest), layer, _sha(layer))


@dataclass
class Setup:
    proxy: FaultProxy
    client: RegistryClient
    sleeps: list[float]
    store: Store

    @property
    def ref(self) -> ImageRef:
        return ImageRef(self.proxy.host, REPO)

    def fetch_layer(self, image: Pushed) -> None:
        with self.client.blob(self.ref, image.layer_digest) as stream:
            self.store.put_blob_file(stream, image.layer_digest, expected_size=LAYER_SIZE)


@pytest.fixture
def setup(fault_proxy: FaultProxy, tmp_path: Path) -> Setup:
    sleeps: list[float] = []
    client = RegistryClient(retry=FAST, sleep=sleeps.append)
    return Setup(fault_proxy, client, sleeps, Store(tmp_path / "store"))


def _blob_gets(proxy: FaultProxy, image: Pushed) -> list[str | None]:
    """The Range header of each GET of the layer, in order (None: the whole blob)."""
    return [s.range for s in proxy.seen(f"/blobs/{image.layer_digest}$", "GET")]


# -- transient answers: retried with back-off --------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_a_transient_status_is_retried_with_growing_pauses(
    setup: Setup, image: Pushed, status: int
) -> None:
    setup.proxy.inject(Fault.error(status), "/manifests/", times=3)
    found = setup.client.manifest(setup.ref, "v1")
    assert found.digest == image.digest
    assert [s.status for s in setup.proxy.seen("/manifests/")] == [status] * 3 + [200]
    first, second, third = setup.sleeps
    assert 0.01 <= first <= 0.02 and 0.02 <= second <= 0.04 and 0.04 <= third <= 0.08


def test_retry_after_is_honoured_and_a_long_one_fails_at_once(setup: Setup, image: Pushed) -> None:
    setup.proxy.inject(Fault.error(503, retry_after="0.3"), "/manifests/")
    assert setup.client.manifest(setup.ref, "v1").digest == image.digest
    assert setup.sleeps == [0.3]

    setup.proxy.clear()
    setup.proxy.inject(Fault.error(429, retry_after="3600"), "/manifests/")
    with pytest.raises(RegistryError, match="asks to retry after 3600 s") as caught:
        setup.client.manifest(setup.ref, "v1")
    assert "waits at most 0.5 s" in caught.value.hint
    assert len(setup.proxy.seen("/manifests/")) == 1 and setup.sleeps == [0.3]


def test_a_failure_that_persists_gives_up_after_the_attempts_with_a_hint(
    setup: Setup, image: Pushed
) -> None:
    setup.proxy.inject(Fault.error(502), f"/blobs/{image.layer_digest}", times=None)
    with pytest.raises(RegistryError, match=r"HTTP 502 .*gave up after 4 tries") as caught:
        setup.fetch_layer(image)
    assert "running the command again is safe" in caught.value.hint
    assert len(_blob_gets(setup.proxy, image)) == 4 and len(setup.sleeps) == 3
    assert not setup.store.has_blob(image.layer_digest)


def test_other_statuses_are_not_retried(setup: Setup, image: Pushed) -> None:
    setup.proxy.inject(Fault.error(400), "/manifests/", times=None)
    with pytest.raises(RegistryError, match="HTTP 400"):
        setup.client.manifest(setup.ref, "v1")
    assert len(setup.proxy.seen("/manifests/")) == 1 and setup.sleeps == []


def test_a_manifest_cut_short_is_fetched_again(setup: Setup, image: Pushed) -> None:
    setup.proxy.inject(Fault.truncate(after=40), "/manifests/", times=2)
    assert setup.client.manifest(setup.ref, "v1").digest == image.digest
    setup.proxy.inject(Fault.reset(after=40), "/manifests/", times=None)
    with pytest.raises(RegistryError, match=r"reading manifest .*gave up after 4 tries"):
        setup.client.manifest(setup.ref, "v1")


def test_a_reset_before_the_answer_is_retried(setup: Setup, image: Pushed) -> None:
    setup.proxy.inject(Fault.reset(after=None), "/manifests/", times=2)
    assert setup.client.manifest(setup.ref, "v1").digest == image.digest
    assert [s.fault for s in setup.proxy.seen("/manifests/")] == ["reset", "reset", None]


# -- broken blob downloads: resumed where they broke -------------------------------------------


def test_a_reset_mid_blob_resumes_and_stores_the_right_bytes(setup: Setup, image: Pushed) -> None:
    setup.proxy.inject(Fault.reset(after=100_000), "/blobs/", times=2)
    setup.fetch_layer(image)
    assert setup.store.blob_path(image.layer_digest).read_bytes() == image.layer
    ranges = _blob_gets(setup.proxy, image)
    assert len(ranges) == 3 and ranges[0] is None  # what arrived before each RST is kept
    assert [s.fault for s in setup.proxy.seen("/blobs/", "GET")] == ["reset", "reset", None]


def test_a_truncated_blob_resumes_with_a_range_from_where_it_stopped(
    setup: Setup, image: Pushed
) -> None:
    setup.proxy.inject(Fault.truncate(after=70_000), "/blobs/")
    setup.proxy.inject(Fault.truncate(after=50_000), "/blobs/")
    setup.fetch_layer(image)
    assert setup.store.blob_path(image.layer_digest).read_bytes() == image.layer
    assert _blob_gets(setup.proxy, image) == [None, "bytes=70000-", "bytes=120000-"]


def test_a_registry_ignoring_range_sends_all_again_and_the_start_is_skipped(
    setup: Setup, image: Pushed
) -> None:
    setup.proxy.inject(Fault.truncate(after=70_000), "/blobs/")
    setup.proxy.inject(Fault.ignore_range(), "/blobs/")
    setup.fetch_layer(image)
    assert setup.store.blob_path(image.layer_digest).read_bytes() == image.layer
    assert [s.status for s in setup.proxy.seen("/blobs/", "GET")] == [200, 200]


def test_a_blob_that_keeps_breaking_is_a_registry_error_not_a_urllib3_one(
    setup: Setup, image: Pushed
) -> None:
    setup.proxy.inject(Fault.reset(after=1000), "/blobs/", times=None)
    with pytest.raises(RegistryError, match=r"download broke .*gave up after 4 tries") as caught:
        setup.fetch_layer(image)
    assert "connection reset by peer" in caught.value.message
    assert caught.value.hint and not setup.store.has_blob(image.layer_digest)


def test_a_stall_is_bounded_by_the_read_timeout_then_resumed(setup: Setup, image: Pushed) -> None:
    setup.proxy.inject(Fault.stall(seconds=5.0, after=20_000), "/blobs/")
    began = time.monotonic()
    setup.fetch_layer(image)
    assert time.monotonic() - began < 3.0  # 0.3 s timeout; the stall itself would take 5 s
    assert _blob_gets(setup.proxy, image) == [None, "bytes=20000-"]


def test_a_stall_that_persists_fails_within_attempts_times_the_timeout(
    setup: Setup, image: Pushed
) -> None:
    setup.proxy.inject(Fault.stall(seconds=5.0, after=0), "/blobs/", times=None)
    began = time.monotonic()
    with pytest.raises(RegistryError, match=r"timed out .*gave up after 4 tries"):
        setup.fetch_layer(image)
    assert time.monotonic() - began < 4.0  # 4 x 0.3 s, pauses < 0.1 s, generous margin
    assert not setup.store.has_blob(image.layer_digest)


def test_a_trickle_below_the_minimum_rate_counts_as_a_stall(
    fault_proxy: FaultProxy, image: Pushed, tmp_path: Path
) -> None:
    policy = RetryPolicy(backoff=0.01, read_timeout=0.3, min_rate=50_000)
    client = RegistryClient(retry=policy, sleep=lambda _s: None)
    fault_proxy.inject(Fault.trickle(chunk=500, every=0.02), "/blobs/")  # ~25 kB/s
    ref = ImageRef(fault_proxy.host, REPO)
    began = time.monotonic()
    with client.blob(ref, image.layer_digest) as stream:
        Store(tmp_path).put_blob_file(stream, image.layer_digest, expected_size=LAYER_SIZE)
    assert time.monotonic() - began < 3.0  # the whole trickle would take 12 s
    ranges = [s.range for s in fault_proxy.seen("/blobs/", "GET")]
    assert len(ranges) >= 2 and ranges[1] and ranges[1].startswith("bytes=")


def test_a_content_length_too_long_is_a_break_and_too_short_is_refused(
    setup: Setup, image: Pushed
) -> None:
    setup.proxy.inject(Fault.wrong_length(+100), "/blobs/")
    setup.fetch_layer(image)  # the rest is asked for, the registry says 416: nothing follows
    assert _blob_gets(setup.proxy, image) == [None, f"bytes={LAYER_SIZE}-"]
    assert setup.store.blob_path(image.layer_digest).read_bytes() == image.layer

    other = Setup(setup.proxy, setup.client, setup.sleeps, Store(setup.store.root.parent / "s2"))
    setup.proxy.inject(Fault.wrong_length(-100), "/blobs/")
    with pytest.raises(IntegrityError, match=f"has {LAYER_SIZE - 100} bytes"):
        other.fetch_layer(image)
    assert not other.store.has_blob(image.layer_digest)


# -- wrong content: never accepted, never stored, not retried ------------------------------------


def test_a_blob_whose_bytes_do_not_match_its_digest_is_never_stored(
    setup: Setup, image: Pushed
) -> None:
    setup.proxy.inject(Fault.corrupt(at=123_456), "/blobs/", times=None)
    with pytest.raises(IntegrityError, match="digest mismatch"):
        setup.fetch_layer(image)
    assert not setup.store.has_blob(image.layer_digest)
    assert not list(setup.store.root.rglob(image.layer_digest[7:]))
    assert len(_blob_gets(setup.proxy, image)) == 1


def test_a_wrong_digest_header_on_a_manifest_is_refused(setup: Setup, image: Pushed) -> None:
    liar = _sha(b"something else")
    setup.proxy.inject(Fault.digest_header(liar), "/manifests/", times=None)
    with pytest.raises(IntegrityError, match=f"header says {liar}"):
        setup.client.manifest(setup.ref, "v1")


def test_without_a_digest_header_a_manifest_by_digest_is_still_checked(
    setup: Setup, image: Pushed
) -> None:
    setup.proxy.inject(Fault.digest_header(""), "/manifests/", times=None)
    assert setup.client.manifest(setup.ref, image.digest).digest == image.digest
    with FaultProxy(setup.proxy.host) as outer:  # two faults on one answer: proxies in a row
        outer.inject(Fault.corrupt(at=5), "/manifests/", times=None)
        with pytest.raises(IntegrityError, match=f"does not match {image.digest}"):
            setup.client.manifest(ImageRef(outer.host, REPO), image.digest)
        assert [s.fault for s in outer.log] == ["corrupt"]  # not retried


# -- the Bearer token flow -----------------------------------------------------------------------


def test_an_anonymous_token_is_fetched_on_a_401_and_used(setup: Setup, image: Pushed) -> None:
    setup.proxy.require_token()
    assert setup.client.manifest(setup.ref, "v1").digest == image.digest
    setup.fetch_layer(image)
    log = [(s.path, s.status, s.token) for s in setup.proxy.log]
    assert log[:3] == [
        (f"/v2/{REPO}/manifests/v1", 401, False),
        ("/token", 200, False),
        (f"/v2/{REPO}/manifests/v1", 200, True),
    ]
    assert log[3:] == [(f"/v2/{REPO}/blobs/{image.layer_digest}", 200, True)]  # token reused


def test_credentials_go_to_the_token_service_and_a_push_gets_a_push_token(
    setup: Setup, image: Pushed, tmp_path: Path
) -> None:
    setup.proxy.require_token("alice", "s3cret")
    auth = base64.b64encode(b"alice:s3cret").decode()
    client = RegistryClient(retry=FAST, auths={setup.proxy.host: auth})
    assert client.manifest(setup.ref, "v1").digest == image.digest
    (tmp_path / "new").write_bytes(b"a new blob")
    assert client.push_blob(setup.ref, _sha(b"a new blob"), 10, tmp_path / "new")
    assert [s.basic for s in setup.proxy.seen("^/token$")] == [True, True]
    blobs = [(s.method, s.status, s.token) for s in setup.proxy.seen("/blobs/")]
    assert blobs == [
        ("HEAD", 404, True),  # the pull token from the manifest GET
        ("POST", 401, True),  # ... is not enough to push: a new token, with credentials
        ("POST", 202, True),
        ("PUT", 201, True),
    ]


def test_wrong_credentials_are_an_access_error(setup: Setup, image: Pushed) -> None:
    setup.proxy.require_token("alice", "s3cret")
    client = RegistryClient(retry=FAST, auths={setup.proxy.host: base64.b64encode(b"a:b").decode()})
    with pytest.raises(RegistryError, match="authentication failed") as caught:
        client.manifest(setup.ref, "v1")
    assert "docker login" in caught.value.hint  # the registry's own hint, not a generic one
    assert len(setup.proxy.seen("^/token$")) == 1  # refused, not retried


def test_a_failing_token_service_is_retried(setup: Setup, image: Pushed) -> None:
    setup.proxy.require_token()
    setup.proxy.inject(Fault.reset(after=None), "^/token$")
    assert setup.client.manifest(setup.ref, "v1").digest == image.digest
    assert len(setup.proxy.seen("^/token$")) == 2


# -- mirrors ---------------------------------------------------------------------------------


def _mirrored(failing_mirror: FaultProxy, registry: RegistryHandle) -> RegistryClient:
    config = RegistryConfig(mirrors={registry.host: (failing_mirror.url,)})
    return RegistryClient(config, retry=FAST, sleep=lambda _s: None)


def test_a_failing_first_mirror_falls_back_to_the_registry_after_one_try(
    failing_mirror: FaultProxy, registry: RegistryHandle, image: Pushed, tmp_path: Path
) -> None:
    client = _mirrored(failing_mirror, registry)
    ref = ImageRef(registry.host, REPO)
    assert client.manifest(ref, "v1").digest == image.digest
    with client.blob(ref, image.layer_digest) as stream:
        Store(tmp_path).put_blob_file(stream, image.layer_digest, expected_size=LAYER_SIZE)
    assert [s.status for s in failing_mirror.log] == [503, 503]  # one try each

    failing_mirror.clear()
    failing_mirror.inject(Fault.reset(after=None), times=None)
    assert client.manifest(ref, "v1").digest == image.digest
    assert [s.fault for s in failing_mirror.log] == ["reset"]


def test_a_cache_miss_stays_a_miss_when_a_mirror_fails(
    failing_mirror: FaultProxy, registry: RegistryHandle, image: Pushed
) -> None:
    client = _mirrored(failing_mirror, registry)
    ref = ImageRef(registry.host, REPO)
    assert client.find_manifest(ref, "no-such-tag") is None
    assert client.find_manifest(ref, "v1") is not None

    failing_mirror.clear()  # the mirror says 404, the registry itself fails: not a miss
    with FaultProxy(registry.host) as origin:
        origin.inject(Fault.error(500), times=None)
        config = RegistryConfig(mirrors={origin.host: (failing_mirror.url,)})
        client = RegistryClient(config, retry=FAST, sleep=lambda _s: None)
        with pytest.raises(RegistryError, match="cannot look up"):
            client.find_manifest(ImageRef(origin.host, REPO), "no-such-tag")


# -- pushes ------------------------------------------------------------------------------------


def test_a_push_that_breaks_starts_a_new_upload_and_publishes_the_right_bytes(
    setup: Setup, tmp_path: Path
) -> None:
    data = random.Random(7).randbytes(200_000)
    (tmp_path / "blob").write_bytes(data)
    setup.proxy.inject(Fault.error(503), "/blobs/uploads/.+", method="PUT")
    setup.proxy.inject(Fault.reset(after=None), "/blobs/uploads/.+", method="PATCH")
    assert setup.client.push_blob(
        setup.ref, _sha(data), len(data), tmp_path / "blob", chunk_size=64_000
    )
    posts = setup.proxy.seen("/blobs/uploads/$", "POST")
    assert len(posts) == 3  # first try: PATCH reset; second: PUT 503; third: done
    with setup.client.blob(setup.ref, _sha(data)) as stream:
        assert stream.read() == data


def test_a_manifest_push_is_retried(setup: Setup, image: Pushed) -> None:
    setup.proxy.inject(Fault.error(500), "/manifests/", method="PUT")
    setup.proxy.inject(Fault.reset(after=None), "/manifests/", method="PUT")
    assert setup.client.push_manifest(setup.ref, "v2", image.manifest, oci.OCI_MANIFEST) == (
        image.digest
    )
    assert [s.status for s in setup.proxy.seen("/manifests/v2", "PUT")] == [500, 0, 201]
    assert setup.client.manifest(setup.ref, "v2").digest == image.digest
