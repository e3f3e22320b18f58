"""The credential broker and the egress policy in a real guest (docs/broker.md).

One boot of the python:3.13-slim stand-in, `user` networking with `network.allow`, and one
generic credential whose upstream is a recording server on the host's loopback. A client in
the guest calls the broker, fetches from an allowed name through the proxy, tries an unlisted
name, a listed name that resolves to loopback, and a direct connection past the proxy; then it
sleeps while the test looks for the credential's value everywhere: the guest's environment and
`/proc/*/environ`, a dump of the guest's memory (QMP), its disk, and every file microagent
wrote on the host (record, store, logs, audit).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent.cli import main
from microagent.runtime.qmp import dump_guest_memory
from testenv.clitools import cli_json as cli
from testenv.upstream import Request, Upstream

pytestmark = pytest.mark.vm
NAME = "broker-vm"
REPORT_TIMEOUT = 600.0
ALLOWED_URL = "https://pypi.org/simple/pip/"

CLIENT = r"""
import json, os, socket, sys, time, urllib.request, urllib.error

def attempt(url, **kw):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, **kw), timeout=120) as r:
            return {"status": r.status, "body": r.read(4096).decode("utf-8", "replace")}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "error": str(e)}
    except Exception as e:
        return {"status": None, "error": f"{type(e).__name__}: {e}"}

report = {}
base = os.environ["INTERNAL_BASE_URL"]
report["broker"] = attempt(
    base + "/v1/echo?q=1", data=b'{"hello": "broker"}',
    headers={"Authorization": "Bearer guest-made-up", "x-api-key": "guest-made-up",
             "Content-Type": "application/json"},
)
report["allowed"] = attempt(os.environ["ALLOWED_URL"])
report["unlisted"] = attempt("https://example.com/")
report["loopback"] = attempt("https://localhost./")  # the dot: past NO_PROXY, to the proxy
try:
    socket.create_connection((os.environ["DIRECT_IP"], 443), timeout=20).close()
    report["direct"] = "connected"
except OSError as e:
    report["direct"] = f"refused: {e}"
report["token"] = os.environ.get("INTERNAL_TOKEN")
os.makedirs("/workspace", exist_ok=True)
with open("/workspace/report.json.tmp", "w") as f:
    json.dump(report, f)
os.rename("/workspace/report.json.tmp", "/workspace/report.json")
print("report written", flush=True)
time.sleep(3600)
"""


def _echo(request: Request) -> bytes:
    return json.dumps({"ok": True, "echo": request.body.decode()}).encode()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    """A recording HTTP upstream on the host's loopback: answers with JSON echoing the body."""
    with Upstream(reply=_echo, content_type="application/json") as server:
        yield server


def _spec(folder: Path, upstream_port: int) -> Path:
    (folder / "client.py").write_text(CLIENT)
    spec = folder / "microagent.yaml"
    spec.write_text(
        f"name: {NAME}\n"
        "image: python:3.13-slim\n"
        "resources: {memoryMiB: 512}\n"
        "network:\n"
        "  mode: user\n"
        "  allow: [pypi.org, localhost]\n"
        "credentials:\n"
        "  - name: internal\n"
        "    from: env:MA_TEST_SENTINEL\n"
        f"    upstream: http://127.0.0.1:{upstream_port}\n"
        "    header: Authorization\n"
        '    format: "Bearer {value}"\n'
        "    baseUrlEnv: INTERNAL_BASE_URL\n"
        "    keyEnv: INTERNAL_TOKEN\n"
        "files:\n"
        "  - {src: client.py, dst: /app/client.py}\n"
        "entrypoint: python3 /app/client.py\n"
    )
    return spec


def _exec(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["exec", NAME, "--", *argv])
    return code, capsys.readouterr().out


def _await_report(capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    deadline = time.monotonic() + REPORT_TIMEOUT
    while time.monotonic() < deadline:
        status = cli(capsys, "status", NAME)
        state = status["event"]["state"]
        assert state in ("starting", "running"), (state, status["event"]["detail"], _logs())
        code, out = _exec(capsys, "cat", "/workspace/report.json")
        if code == 0 and out.strip():
            report: dict[str, Any] = json.loads(out)
            return report
        time.sleep(3)
    pytest.fail("the guest client wrote no report in time")


def _logs() -> str:
    """The supervisor's and gateway's logs and the serial console's tail (for failures)."""
    runtime = Path(os.environ["MICROAGENT_HOME"]) / "workspaces" / NAME / "runtime"
    texts = []
    for name in ("supervisor.log", "gateway.log"):
        path = runtime / name
        if path.exists():
            texts.append(f"--- {name}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(texts)


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink() and _contains(path, needle):
            found.append(path)
    return found


def _contains(path: Path, needle: bytes, chunk: int = 8 << 20) -> bool:
    tail = b""
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            if needle in tail + block:
                return True
            tail = block[-len(needle) :]
    return False


def test_the_key_never_enters_the_guest_and_egress_is_by_name(
    env: Path,
    upstream: Upstream,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sentinel = "sk-sentinel-" + secrets.token_hex(16)
    monkeypatch.setenv("MA_TEST_SENTINEL", sentinel)
    spec = _spec(tmp_path, upstream.port)
    direct_ip = socket.gethostbyname("pypi.org")
    cli(capsys, "delete", "-y", "--force", NAME, code=None)
    cli(
        capsys, "create", "--file", str(spec), "--credential", "internal",
        "--env", f"DIRECT_IP={direct_ip}", "--env", f"ALLOWED_URL={ALLOWED_URL}",
    )  # fmt: skip
    cli(capsys, "start", NAME)
    vm_dir = _vm_dir(env)
    try:
        report = _await_report(capsys)
        _check_report(report, upstream, sentinel)
        _check_guest_holds_no_key(capsys, env, sentinel, tmp_path)
    finally:
        cli(capsys, "halt", NAME, code=None)
    _check_audit(capsys)
    needle = sentinel.encode()
    assert _files_holding(env, needle) == []  # store, record, state disk, run dir, audit
    if vm_dir.exists():  # the VM's directory: sockets, serial log, the gateway's config
        assert _files_holding(vm_dir, needle) == []
    cli(capsys, "delete", "-y", NAME)


def _check_report(report: dict[str, Any], upstream: Upstream, sentinel: str) -> None:
    broker = report["broker"]
    assert broker["status"] == 200, report
    assert json.loads(broker["body"]) == {"ok": True, "echo": '{"hello": "broker"}'}
    assert len(upstream.requests) == 1, upstream.requests
    seen = upstream.requests[0]
    assert seen.headers["authorization"] == f"Bearer {sentinel}"  # the real key, added on the host
    assert "x-api-key" not in seen.headers  # the guest's own auth header was dropped
    assert seen.path == "/v1/echo?q=1"
    assert report["token"] == "microagent-brokered"
    assert report["allowed"]["status"] == 200, report["allowed"]
    assert report["unlisted"]["status"] is None and "403" in report["unlisted"]["error"]
    assert report["loopback"]["status"] is None and "403" in report["loopback"]["error"]
    assert report["direct"].startswith("refused"), report["direct"]


def _check_guest_holds_no_key(
    capsys: pytest.CaptureFixture[str], home: Path, sentinel: str, tmp_path: Path
) -> None:
    environ_of_all = "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'"
    code, environ = _exec(capsys, "sh", "-c", environ_of_all)
    assert code == 0 and "INTERNAL_TOKEN=microagent-brokered" in environ
    assert sentinel not in environ
    dump = tmp_path / "guest-memory.elf"
    dump_guest_memory(_vm_dir(home), dump)
    assert dump.stat().st_size > 256 << 20  # the whole RAM of the guest
    assert _contains(dump, b"microagent-brokered")  # the dump holds the guest's environment
    assert not _contains(dump, sentinel.encode())
    dump.unlink()


def _vm_dir(home: Path) -> Path:
    for runtime in (home / "workspaces" / NAME).rglob("runtime.json"):
        data = json.loads(runtime.read_text())
        if data.get("vmDir"):
            return Path(data["vmDir"])
    pytest.fail("no vmDir in the workspace's runtime.json")


def _check_audit(capsys: pytest.CaptureFixture[str]) -> None:
    entries = cli(capsys, "audit", NAME)
    rows = entries if isinstance(entries, list) else entries.get("entries", [])
    brokered = [e for e in rows if e["kind"] == "broker"]
    assert [(e["credential"], e["status"], e["decision"]) for e in brokered] == [
        ("internal", 200, "allow")
    ]
    assert "q=1" not in json.dumps(brokered)  # no query strings in the log
    egress = {(e["host"], e["decision"]) for e in rows if e["kind"] == "egress"}
    assert ("pypi.org", "allow") in egress
    assert ("example.com", "deny") in egress and ("localhost", "deny") in egress
    counts = cli(capsys, "status", NAME)["audit"]
    assert counts["requests"] >= 4 and counts["denied"] >= 2, counts
