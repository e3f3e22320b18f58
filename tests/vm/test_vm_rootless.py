"""The product as a normal user (issue 17): the CLI creates (a setup step boots a build VM),
starts, execs into, halts, copies from and deletes a workspace with ``user`` networking and a
published port, and runs a one-shot VM with a guest->host forward, all without root: the
egress filter still blocks the host, the published port and the forward still work, and
nothing is left running or written under /run or /var.

When the tests run as root (as CI does), the CLI runs as an unprivileged uid through
``setpriv`` (no passwd entry needed); when they already run as a normal user, as that user.
That user gets a private home (store, temp and runtime dirs under it), a copy of the
session's guest kit and busybox image, and a virtualenv of its own whose ``.pth`` points at
this checkout and the session's packages (copied first where that user cannot read them).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from microagent.kit.guestkit import GuestKit
from microagent.runner import find_tool, run
from microagent.runtime import network
from microagent.runtime.network import parse_host_addresses
from testenv import standin
from testenv.ports import free_port
from testenv.prereq import unavailable

pytestmark = pytest.mark.vm
UID = 61999  # the unprivileged uid the CLI runs as when the tests run as root
NAME = "rootless-ws"
SRC = Path(__file__).resolve().parents[2] / "src"
CLI = "import sys; from microagent.cli import main; sys.exit(main())"
PAGE = "GUEST-PAGE"


@dataclass(frozen=True)
class User:
    """An unprivileged user and how to run the microagent CLI as that user."""

    uid: int
    home: Path
    python: str  # a virtualenv's interpreter that imports this checkout

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": str(self.home),
            "TMPDIR": str(self.home / "tmp"),
            "MICROAGENT_HOME": str(self.home / "microagent"),
            "MICROAGENT_KERNEL": str(self.home / "kit" / "vmlinux"),
            "MICROAGENT_INITRD": str(self.home / "kit" / "initrd"),
            "LC_ALL": "C.UTF-8",
            "CI": os.environ.get("CI", ""),
        }

    def prefix(self) -> list[str]:
        if os.geteuid() == self.uid:
            return []
        ids = [f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups"]
        return [find_tool("setpriv"), *ids, "--"]

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        argv = [*self.prefix(), self.python, "-c", CLI, *args]
        return subprocess.run(
            argv,
            env=self.env(),
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ok(self, *args: str, timeout: float = 300) -> str:
        done = self.cli(*args, timeout=timeout)
        assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
        return done.stdout


def _as(uid: int, argv: list[str], env: dict[str, str] | None = None) -> bool:
    """Whether ``argv`` run as ``uid`` succeeds."""
    user = User(uid, Path("/"), "")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/", **(env or {})}
    done = subprocess.run([*user.prefix(), *argv], env=env, capture_output=True, check=False)
    return done.returncode == 0


# The interpreter must run, read its own library and start itself again (the supervisor is
# ``sys.executable -I``), and be this session's version (the compiled packages are shared).
USABLE = (
    "import os, sys; assert sys.version_info[:2] == {version}; "
    "assert os.access(sys.executable, os.X_OK) and os.access(os.__file__, os.R_OK)"
)


def _python_for(uid: int, home: Path) -> str:
    """A virtualenv ``uid`` owns, on an interpreter it can run, whose site-packages point
    (a ``.pth`` file) at this checkout and the session's packages, or at copies of them
    where ``uid`` cannot read the originals (a checkout under root's home, as in CI)."""
    check = USABLE.format(version=tuple(sys.version_info[:2]))
    candidates = [os.path.realpath(sys.executable), "/usr/bin/python3"]
    python = next((p for p in candidates if _as(uid, [p, "-I", "-c", check])), None)
    if python is None:
        unavailable(f"no Python {sys.version_info[:2]} that uid {uid} can run ({candidates})")
        raise AssertionError("unreachable")
    venv = home / "venv"
    assert _as(uid, [python, "-m", "venv", "--without-pip", str(venv)])
    paths = sysconfig.get_paths()
    packages = [str(SRC), *dict.fromkeys((paths["purelib"], paths["platlib"]))]
    readable = [p for p in packages if _as(uid, ["test", "-r", f"{p}/."], {})]
    if readable != packages:
        packages = _copy_packages(packages, home / "python", uid)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "microagent-checkout.pth").write_text("\n".join(packages) + "\n")
    assert _as(uid, [str(venv / "bin" / "python"), "-I", "-c", "import microagent.cli"])
    return str(venv / "bin" / "python")


def _copy_packages(packages: list[str], into: Path, uid: int) -> list[str]:
    copies = []
    for i, source in enumerate(packages):
        target = into / str(i)
        shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns("*.pyc"))
        copies.append(str(target))
    _chown_tree(into, uid)
    return copies


def _chown_tree(root: Path, uid: int) -> None:
    if os.geteuid() != 0:
        return
    os.chown(root, uid, uid)
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.chown(os.path.join(folder, name), uid, uid, follow_symlinks=False)


def _owned_by(uid: int, *roots: str) -> list[str]:
    found = run(["find", *roots, "-xdev", "-uid", str(uid)], check=False).stdout
    return found.split()


@pytest.fixture(scope="module")
def user(kit: GuestKit, busybox_layout: standin.BuiltImage) -> Iterator[User]:
    uid = os.geteuid() or UID
    problems = [f"{p.what} (fix: {p.fix})" for p in network.userns_problems()]
    tun = str(network.TUN_DEVICE)
    if uid != os.geteuid() and not _as(uid, ["sh", "-c", f"test -r {tun} && test -w {tun}"]):
        problems.append(f"uid {uid} cannot open {tun} (fix: chmod 0666 {tun}, as distributions do)")
    if problems:
        unavailable("; ".join(problems))
    home = Path(tempfile.mkdtemp(prefix="microagent-rootless-"))
    try:
        for sub in ("tmp", "kit", "project"):
            (home / sub).mkdir()
        shutil.copyfile(kit.kernel, home / "kit" / "vmlinux")
        shutil.copyfile(kit.initrd, home / "kit" / "initrd")
        shutil.copytree(busybox_layout.layout, home / "project" / "layout")
        _chown_tree(home, uid)
        yield User(uid, home, _python_for(uid, home))
    finally:
        shutil.rmtree(home, ignore_errors=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"HOST-SECRET"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        return


@pytest.fixture(scope="module")
def host_service() -> Iterator[tuple[str, int]]:
    """A host service on every address: what the guest must not reach on its own."""
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield "0.0.0.0", server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _get(port: int, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as reply:
        return bytes(reply.read())


def _await_page(port: int, deadline: float) -> bytes:
    while True:
        try:
            return _get(port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _parents() -> dict[int, int]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return found


def _kin(parents: dict[int, int]) -> set[int]:
    """This process, its ancestors and its descendants (pytest, fixtures, ps itself)."""
    kin, pid = set(), os.getpid()
    while pid > 1:
        kin.add(pid)
        pid = parents.get(pid, 0)
    grew = True
    while grew:
        more = {child for child, parent in parents.items() if parent in kin and child not in kin}
        kin |= more
        grew = bool(more)
    return kin


def _processes_of(uid: int, grace: float = 10.0) -> list[str]:
    """The live (not zombie) processes of ``uid`` that are not this test run's own, once
    they had ``grace`` seconds to end."""
    deadline = time.monotonic() + grace
    while True:
        listed = run(["ps", "-o", "stat=,pid=,args=", "-u", str(uid)], check=False).stdout
        kin = _kin(_parents())
        rows = [line.split(maxsplit=2) for line in listed.splitlines() if line.strip()]
        alive = [
            " ".join(r)
            for r in rows
            if r[0][0] != "Z" and int(r[1]) not in kin and "stat=,pid=,args=" not in r[-1]
        ]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _probe_script(targets: list[str]) -> str:
    return (
        f"for t in {' '.join(targets)}; do timeout 3 wget -q -O- http://$t/ >/dev/null 2>&1 "
        '&& echo "REACH $t" || echo "BLOCK $t"; done; '
        "wget -q -O- http://deb.debian.org/debian/dists/bookworm/Release | head -n1"
    )


def test_a_workspace_with_user_networking_as_a_normal_user(
    user: User, host_service: tuple[str, int]
) -> None:
    if user.uid == os.geteuid():
        assert os.geteuid() != 0
    port = free_port()
    spec = user.home / "project" / "microagent.yaml"
    spec.write_text(
        f"name: {NAME}\n"
        "image: oci:layout:latest\n"
        "profile: tiny\n"
        "network: {mode: user}\n"
        f"setup: ['mkdir -p /www && echo {PAGE} > /www/index.html']\n"
        "entrypoint: exec httpd -f -p 8000 -h /www\n"
    )
    _chown_tree(spec.parent, user.uid)
    _, service_port = host_service
    host_ips = parse_host_addresses(run(["ip", "-4", "-o", "addr", "show"]).stdout)
    blocked = [f"10.0.2.2:{service_port}", *(f"{ip}:{service_port}" for ip in host_ips[:2])]
    try:
        user.ok("create", "-f", str(spec), "-p", f"127.0.0.1:{port}:8000", timeout=600)
        user.ok("start", NAME)
        # The published port: the host reaches the guest's httpd through the user's slirp4netns.
        assert _await_page(port, time.monotonic() + 240) == f"{PAGE}\n".encode()
        probes = user.ok("exec", NAME, "--", "sh", "-c", _probe_script(blocked), timeout=120)
        lines = probes.splitlines()
        assert lines[: len(blocked)] == [f"BLOCK {t}" for t in blocked], probes
        assert lines[len(blocked) :] == ["Origin: Debian"], probes  # DNS and NAT work
        status = json.loads(user.ok("--json", "status", NAME))
        assert status["event"]["state"] == "running", status
        assert [(p["hostPort"], p["live"]) for p in status["network"]["ports"]] == [(port, True)]
        user.ok("halt", NAME)
        # VMM, slirp4netns, relays, the namespace holder: all gone with the VM.
        assert _processes_of(user.uid) == []
        with pytest.raises(OSError):
            _get(port, timeout=3.0)
        user.ok("cp", f"{NAME}:/www/index.html", str(user.home / "tmp" / "page"))
        assert (user.home / "tmp" / "page").read_text() == f"{PAGE}\n"
    finally:
        user.cli("delete", "-y", "--force", NAME)
    assert _processes_of(user.uid) == []
    assert _owned_by(user.uid, "/run", "/var", "/dev/shm") == []


def test_a_one_shot_run_forwards_to_one_host_service(
    user: User, host_service: tuple[str, int], rootfs: Path
) -> None:
    """``run --forward``: the guest reaches the one host service it is given (through a unix
    socket bridge in the user's state dir), and nothing else of the host."""
    _, service_port = host_service
    image = user.home / "tmp" / "root.ext4"
    script = (
        "wget -q -O- http://10.0.2.100/; echo; "
        f"timeout 3 wget -q -O- http://10.0.2.2:{service_port}/ || echo BLOCKED"
    )
    shutil.copyfile(rootfs, image)
    _chown_tree(image.parent, user.uid)
    out = user.ok(
        "run", "--rootfs", str(image), "--network", "user",
        "--forward", f"80:{service_port}", "--", "sh", "-c", script,
    )  # fmt: skip
    assert out.splitlines()[-2:] == ["HOST-SECRET", "BLOCKED"], out
    assert _processes_of(user.uid) == []
