"""``user`` networking that keeps the host out of reach (measured recipe, feasibility §9.3).

QEMU's own slirp (``-netdev user``) gives the guest outbound NAT but maps 10.0.2.2 to the host's
loopback. So the VMM runs in a fresh network namespace whose only way out is
``slirp4netns --disable-host-loopback``, and an iptables OUTPUT filter in that namespace lets
only global unicast IPv4 out: it rejects the host's own addresses, every range that is not
globally routable (private, CGNAT, link-local, loopback, "this network", documentation,
benchmarking, multicast, reserved, broadcast) and the cloud metadata/agent addresses, with DNS to
the host's resolvers excepted. IPv6 is off in QEMU and slirp4netns, and an ip6tables filter in
the namespace rejects all of it besides.
Explicit guest->host forwards use slirp ``guestfwd`` with a ``cmd:`` that connects to a unix
socket (the filesystem is shared with the host, the netns loopback is not); a ``socat`` bridge
on the host side connects that socket to ``127.0.0.1:PORT``.

Published ports (host->guest): slirp4netns, which runs in the host's namespace, listens on
``HOST:HOSTPORT`` (``add_hostfwd`` over its API socket) and connects to the namespace's own
address ``10.9.0.100:GUESTPORT``. There a ``socat`` relay accepts (backlog 128) and connects to
``127.0.0.1:GUESTPORT``, where QEMU's slirp listens (``hostfwd=``) and connects to the guest.
The relay is there because libslirp listens with a backlog of 1 and QEMU under TCG accepts
slowly: a burst of connections overflowed QEMU's queue, and slirp4netns's user-mode TCP
retries so slowly that requests stalled for a minute; the kernel's retries (the relay's
connect) are quick. The egress filter lets out only the replies of connections made to the
relay from outside (conntrack ``ESTABLISHED``, reply direction, from the published ports).

As root the namespace is a named one (``ip netns add``, entered with ``ip netns exec``). As a
normal user it is the rootless-container recipe: a holder process made by ``unshare --user
--map-root-user --net --mount`` owns a user namespace (we are root in it, nothing more on the
host) with its own network and mount namespaces; every helper and the VMM enter it with
``nsenter --preserve-credentials``, and slirp4netns attaches to it by path (``--userns-path``,
``--netns-type=path``, as rootlesskit and podman do). The tap device, the iptables/ip6tables
filter and the resolv.conf override (a bind mount in that mount namespace) all live inside;
the namespaces vanish with the holder, which dies with its parent (``--pdeathsig``). Needs
unprivileged user namespaces and a ``/dev/net/tun`` the user may open (mode 0666, as
distributions ship it); :func:`userns_problems` says what is missing.
Argv and rules are built by pure functions; :class:`NetworkSandbox` runs them and always
tears down.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import secrets
import select
import shlex
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from microagent import runner
from microagent.broker.addresses import (
    DOCUMENTATION_RANGES,  # noqa: F401  (tests read it here)
    METADATA_ADDRESSES,
    NON_GLOBAL_RANGES,
)
from microagent.errors import ConflictError, InvalidInputError, ToolError, VMError
from microagent.runtime.backend import FORWARD_ADDRESS, Forward, NetworkConfig, PublishedPort
from microagent.runtime.configdisk import GuestNetwork, NetworkMode
from microagent.runtime.control import tail_text

NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "microagent-"
SLIRP_CIDR = "10.9.0.0/24"
SLIRP_DNS = "10.9.0.3"
NETNS_ADDRESS = str(ipaddress.ip_network(SLIRP_CIDR)[100])  # tap0, as --configure sets it
GUEST_ADDRESS = GuestNetwork().address.split("/")[0]
API_SOCKET = "slirp.sock"  # in the VM's state dir (no longer than control.sock: path limit)
API_TIMEOUT = 5.0
API_REPLY_MAX = 64 << 10
RELAY_BACKLOG = 128
# After one side ends, socat waits this long for the other (half-close) before it gives up;
# its default (0.5 s) would cut a reply that takes longer after the client's shutdown.
RELAY_HALF_CLOSE_SECONDS = 3600
READY_TIMEOUT = 10.0
HOST_TOOLS = ("ip", "iptables-restore", "ip6tables-restore", "slirp4netns")
ROOTLESS_TOOLS = ("unshare", "nsenter", "setpriv", "sleep")  # the user-namespace path adds these
HOLDER_COMMAND = "sleep"  # what the namespace holder runs (its comm once the namespaces exist)
SYSCTL = Path("/proc/sys")
TUN_DEVICE = Path("/dev/net/tun")
HOST_IPV6 = Path("/proc/net/if_inet6")  # absent when the kernel has no IPv6
# Characters socat parses in an address (1.7: , : ! ' " and 1.8 adds \ and brackets).
SOCAT_SPECIAL = frozenset(",:!'\"\\()[]{}")


@dataclass(frozen=True)
class EgressPolicy:
    """What the namespace filter allows and rejects."""

    resolvers: tuple[str, ...]
    rejected: tuple[str, ...]
    netns_resolv_conf: str | None = None  # written to /etc/netns/<name>/resolv.conf if set
    published_ports: tuple[int, ...] = ()  # namespace ports whose replies may leave
    deny_all: bool = False  # nothing else leaves (network.allow: egress goes by the proxy)


def parse_resolvers(resolv_conf: str) -> tuple[str, ...]:
    """IPv4 nameserver addresses from resolv.conf text."""
    found = []
    for line in resolv_conf.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(parts[1]).version == 4:
                    found.append(parts[1])
    return tuple(found)


def parse_host_addresses(ip_output: str) -> tuple[str, ...]:
    """IPv4 addresses from ``ip -4 -o addr show`` output (loopback excluded)."""
    found = []
    for line in ip_output.splitlines():
        parts = line.split()
        if "inet" in parts:
            addr = parts[parts.index("inet") + 1].split("/")[0]
            if not ipaddress.ip_address(addr).is_loopback:
                found.append(addr)
    return tuple(dict.fromkeys(found))


def _usable_resolver(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_reserved)


def egress_policy(
    resolvers: Sequence[str],
    host_addresses: Sequence[str],
    published_ports: Sequence[int] = (),
    *,
    direct_egress: bool = True,
) -> EgressPolicy:
    """Global unicast only: reject the host's addresses, every non-global range and the
    metadata addresses; allow DNS (port 53) to the host's unicast, non-loopback resolvers,
    and the replies of connections made to ``published_ports`` from outside.

    With only loopback resolvers (systemd-resolved style) the namespace uses slirp4netns's
    own DNS forwarder instead. Without ``direct_egress`` only the published replies leave.
    """
    ports = tuple(sorted(set(published_ports)))
    if not direct_egress:
        return EgressPolicy((), (), None, ports, deny_all=True)
    usable = tuple(r for r in resolvers if _usable_resolver(r))
    resolv_conf = None
    if not usable:
        usable = (SLIRP_DNS,)
        resolv_conf = f"nameserver {SLIRP_DNS}\n"
    rejected = tuple(dict.fromkeys((*host_addresses, *NON_GLOBAL_RANGES, *METADATA_ADDRESSES)))
    return EgressPolicy(usable, rejected, resolv_conf, ports)


def iptables_rules(policy: EgressPolicy) -> str:
    """An ``iptables-restore`` ruleset for the namespace's filter table."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines.append("-A OUTPUT -o lo -j ACCEPT")
    for port in policy.published_ports:
        # A published connection comes in through slirp4netns from the gateway (or the
        # client's own address): its replies leave, nothing the namespace starts does.
        lines.append(
            f"-A OUTPUT -s {NETNS_ADDRESS}/32 -p tcp --sport {port} "
            "-m conntrack --ctstate ESTABLISHED --ctdir REPLY -j ACCEPT"
        )
    for resolver in policy.resolvers:
        for proto in ("udp", "tcp"):
            lines.append(f"-A OUTPUT -d {resolver}/32 -p {proto} --dport 53 -j ACCEPT")
    for target in policy.rejected:
        cidr = target if "/" in target else f"{target}/32"
        lines.append(f"-A OUTPUT -d {cidr} -j REJECT")
    if policy.deny_all:
        lines.append("-A OUTPUT -j REJECT")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def ip6tables_rules() -> str:
    """An ``ip6tables-restore`` ruleset rejecting all IPv6 output but the namespace's own
    loopback (the guest has no IPv6; this keeps it so if anything in the namespace does)."""
    return "\n".join(
        [
            "*filter",
            ":INPUT ACCEPT [0:0]",
            ":FORWARD ACCEPT [0:0]",
            ":OUTPUT ACCEPT [0:0]",
            "-A OUTPUT -o lo -j ACCEPT",
            "-A OUTPUT -j REJECT",
            "COMMIT",
            "",
        ]
    )


def slirp4netns_argv(
    binary: str,
    netns: str | Path,
    ready_fd: int,
    exit_fd: int,
    api_socket: Path | None = None,
    *,
    userns: Path | None = None,
) -> list[str]:
    """slirp4netns joining ``netns`` (a name under /run/netns, or a namespace file's path)
    to the outside, host loopback disabled; joining the user namespace ``userns`` first when
    given (the rootless path); with an API socket (for published ports) when given."""
    api = [f"--api-socket={api_socket}"] if api_socket is not None else []
    owner = [f"--userns-path={userns}"] if userns is not None else []
    target = netns if isinstance(netns, Path) else NETNS_DIR / netns
    return [
        binary,
        "--configure",
        "--mtu=65520",
        "--disable-host-loopback",
        f"--cidr={SLIRP_CIDR}",
        *owner,
        "--netns-type=path",
        f"--ready-fd={ready_fd}",
        f"--exit-fd={exit_fd}",
        *api,
        str(target),
        "tap0",
    ]


def netns_exec(netns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` run inside ``netns`` (``ip netns exec`` execs it: same pid)."""
    return ["ip", "netns", "exec", netns, *argv]


def holder_argv(setpriv: str, unshare: str, sleep: str) -> list[str]:
    """The process that owns the rootless namespaces: a user namespace mapping only our uid
    to root, with a network and a mount namespace; it sleeps until killed, or until its
    parent dies (SIGKILL)."""
    return [
        setpriv,
        "--pdeathsig",
        "KILL",
        unshare,
        "--user",
        "--map-root-user",
        "--net",
        "--mount",
        "--",
        sleep,
        "infinity",
    ]


def nsenter_argv(nsenter: str, pid: int | str, argv: Sequence[str]) -> list[str]:
    """``argv`` run in the namespaces of holder ``pid``, keeping our uid (root there): nsenter
    execs it without a fork (same pid), so a parent-death signal set inside still holds."""
    return [
        nsenter,
        f"--target={pid}",
        "--user",
        "--net",
        "--mount",
        "--preserve-credentials",
        "--",
        *argv,
    ]


def _qemu_escape(value: str) -> str:
    return value.replace(",", ",,")


def check_socket_path(path: Path) -> Path:
    """``path`` if socat can take it as an address and QEMU's option syntax can carry it:
    no socat syntax characters, nothing unprintable (a newline would end the option)."""
    text = str(path)
    bad = sorted({c for c in text if c in SOCAT_SPECIAL or not c.isprintable()})
    if bad:
        raise InvalidInputError(
            f"forward socket path {text!r} contains {''.join(bad)!r}, which socat cannot "
            "take in an address",
            hint="use a socket path without , : ! ' \" \\ ( ) [ ] { } or control characters",
        )
    return path


def guestfwd_option(forward: Forward, socket_path: Path, socat: str) -> str:
    """The ``guestfwd=`` part of ``-netdev user``: one helper per guest connection.

    The ``cmd:`` is a command line (split shell-style): every word is shell-quoted, then
    QEMU's commas are doubled; the socket path is checked for what socat would misparse.
    """
    address = f"UNIX-CONNECT:{check_socket_path(socket_path)}"
    cmd = shlex.join((socat, "STDIO", address))
    return f"guestfwd=tcp:{FORWARD_ADDRESS}:{forward.guest_port}-cmd:{_qemu_escape(cmd)}"


def netns_ports(published: Iterable[PublishedPort]) -> tuple[int, ...]:
    """The namespace-side ports of ``published``: each guest port once, as itself."""
    return tuple(sorted({p.guest_port for p in published}))


def _check_port(port: int) -> int:
    if type(port) is not int or not 0 < port < 65536:
        raise InvalidInputError(f"guest port {port!r} is not 1-65535")
    return port


def hostfwd_option(port: int) -> str:
    """The ``hostfwd=`` part of ``-netdev user`` (QEMU runs in the namespace): the
    namespace's loopback ``127.0.0.1:port`` reaches the guest's ``port``."""
    return f"hostfwd=tcp:127.0.0.1:{_check_port(port)}-{GUEST_ADDRESS}:{port}"


def relay_argv(socat: str, port: int) -> list[str]:
    """The relay (run in the namespace) from ``10.9.0.100:port``, where slirp4netns connects,
    to QEMU's listener on ``127.0.0.1:port``: one child per connection, a deep backlog."""
    listen = f"TCP4-LISTEN:{_check_port(port)},bind={NETNS_ADDRESS},reuseaddr,fork"
    return [
        socat,
        "-t",
        str(RELAY_HALF_CLOSE_SECONDS),
        f"{listen},backlog={RELAY_BACKLOG}",
        f"TCP4:127.0.0.1:{port}",
    ]


def listening(pid: int, address: str, port: int) -> bool:
    """Whether ``address:port`` listens (TCP) in the network namespace of process ``pid``."""
    packed = ipaddress.IPv4Address(address).packed[::-1].hex().upper()
    try:
        table = Path(f"/proc/{pid}/net/tcp").read_text()
    except OSError:
        return False
    wanted = f"{packed}:{port:04X}"
    return any(
        parts[1] == wanted and parts[3] == "0A"  # 0A: LISTEN
        for parts in (line.split() for line in table.splitlines()[1:])
        if len(parts) > 3
    )


def add_hostfwd_request(port: PublishedPort) -> bytes:
    """slirp4netns's ``add_hostfwd``: listen on the host's ``host:host_port`` and connect
    to the namespace's address at the guest port (values checked by PublishedPort)."""
    arguments = {
        "proto": port.protocol,
        "host_addr": port.host,
        "host_port": port.host_port,
        "guest_addr": NETNS_ADDRESS,
        "guest_port": port.guest_port,
    }
    return json.dumps({"execute": "add_hostfwd", "arguments": arguments}).encode()


LIST_HOSTFWD = b'{"execute": "list_hostfwd"}'


def api_socket_path(state_dir: Path) -> Path:
    """Where the VM's slirp4netns serves its API (only while it publishes ports)."""
    return state_dir / API_SOCKET


def api_call(path: Path, request: bytes, timeout: float = API_TIMEOUT) -> dict[str, Any]:
    """One request on slirp4netns's API socket (it wants the write side shut after each)
    and its JSON reply, bounded; VMError when there is no sound answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            reply = _read_bounded(sock, API_REPLY_MAX)
        data = json.loads(reply)
    except (OSError, ValueError) as exc:
        raise VMError(f"slirp4netns API ({path}) did not answer: {exc}") from exc
    if not isinstance(data, dict):
        raise VMError(f"slirp4netns API ({path}) sent {type(data).__name__}, not an object")
    return data


def _read_bounded(sock: socket.socket, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := sock.recv(8192):
        size += len(chunk)
        if size > limit:
            raise ValueError(f"reply longer than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def probe_bind(port: PublishedPort) -> None:
    """Fail clearly unless ``host:host_port`` can be listened on now (slirp4netns listens
    with SO_REUSEADDR, so the probe does too; a lingering TIME_WAIT is no conflict)."""
    where = f"{port.host}:{port.host_port}"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((port.host, port.host_port))
            sock.listen(1)
    except OSError as exc:
        raise _bind_error(port, where, exc) from exc


def _bind_error(port: PublishedPort, where: str, exc: OSError) -> Exception:
    if exc.errno == errno.EADDRINUSE:
        return ConflictError(
            f"cannot publish {port.describe()}: host port {where} is already in use",
            hint=f"stop what listens there (ss -ltnp 'sport = :{port.host_port}') "
            "or publish another host port",
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return InvalidInputError(
            f"cannot publish {port.describe()}: {port.host} is not an address of this host",
            hint="use 127.0.0.1 (the default), 0.0.0.0 or an address from `ip -4 addr`",
        )
    if exc.errno == errno.EACCES:
        return InvalidInputError(
            f"cannot publish {port.describe()}: ports below 1024 need root",
            hint="publish a host port of 1024 or more",
        )
    return VMError(f"cannot publish {port.describe()}: {exc.strerror or exc}")


def check_published(published: Iterable[PublishedPort]) -> None:
    """Every host listener of ``published`` is free now (before anything boots)."""
    for port in published:
        probe_bind(port)


def publish(api_socket: Path, port: PublishedPort) -> int:
    """Make slirp4netns listen for ``port``; its forward id. A failure after a free probe
    means the port was taken in between (slirp4netns says no more than "failed")."""
    reply = api_call(api_socket, add_hostfwd_request(port))
    result = reply.get("return")
    if not isinstance(result, dict) or type(result.get("id")) is not int:
        error = reply.get("error")
        desc = error.get("desc") if isinstance(error, dict) else None
        raise VMError(
            f"cannot publish {port.describe()}: slirp4netns refused ({str(desc)[:200]})",
            hint=f"is {port.host}:{port.host_port} in use? (ss -ltnp 'sport = :{port.host_port}')",
        )
    return int(result["id"])


def live_published(api_socket: Path) -> tuple[PublishedPort, ...]:
    """The ports slirp4netns publishes now (empty when it does not answer)."""
    try:
        reply = api_call(api_socket, LIST_HOSTFWD, timeout=1.0)
    except VMError:
        return ()
    result = reply.get("return")
    entries = result.get("entries") if isinstance(result, dict) else reply.get("entries")
    return tuple(_entries(entries if isinstance(entries, list) else []))


def _entries(entries: list[Any]) -> Iterable[PublishedPort]:
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("guest_addr") != NETNS_ADDRESS:
            continue
        with contextlib.suppress(InvalidInputError):
            yield PublishedPort(
                entry.get("host_addr", ""),
                entry.get("host_port", 0),
                entry.get("guest_port", 0),
                entry.get("proto", ""),
            )


def bridge_argv(socat: str, socket_path: Path, host_port: int) -> list[str]:
    """A host-side socat that accepts on ``socket_path`` and connects to 127.0.0.1:PORT."""
    return [
        socat,
        f"UNIX-LISTEN:{check_socket_path(socket_path)},fork,mode=600,unlink-early",
        f"TCP:127.0.0.1:{host_port}",
    ]


def forward_socket(state_dir: Path, forward: Forward) -> Path:
    """Where the guestfwd helper connects for ``forward``."""
    return forward.unix_socket or state_dir / f"fwd-{forward.guest_port}.sock"


def netns_name() -> str:
    """A fresh namespace name that records our pid (for stale cleanup)."""
    return f"{NETNS_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"


def stale_namespaces(names: Sequence[str]) -> list[str]:
    """Our namespaces whose creating process is gone."""
    stale = []
    for name in names:
        if not name.startswith(NETNS_PREFIX):
            continue
        pid = name.removeprefix(NETNS_PREFIX).split("-")[0]
        if pid.isdigit() and not runner.pid_alive(int(pid)):
            stale.append(name)
    return stale


def rootless() -> bool:
    """Whether the user-namespace path is taken: we are not root."""
    return os.geteuid() != 0


@dataclass(frozen=True)
class Problem:
    """What keeps ``user`` networking from working here, and the command that fixes it."""

    what: str
    fix: str
    tools: tuple[str, ...] = ()  # the missing programs, when that is the problem


def _sysctl(name: str, root: Path) -> int | None:
    try:
        return int((root / name).read_text().strip())
    except (OSError, ValueError):
        return None


def _persisted(setting: str) -> str:
    return f"sudo sysctl -w {setting} (keep it: a line `{setting}` in /etc/sysctl.d/99-userns.conf)"


def userns_problems(sysctl: Path | None = None, tun: Path | None = None) -> list[Problem]:
    """Why a normal user cannot make the rootless namespaces here (the kernel's switches for
    user namespaces under ``sysctl``, the ``tun`` device slirp4netns opens), each with its fix."""
    sysctl, tun = sysctl or SYSCTL, tun or TUN_DEVICE
    found = []
    if _sysctl("user/max_user_namespaces", sysctl) == 0:
        found.append(
            Problem(
                "user namespaces are disabled (user.max_user_namespaces = 0)",
                _persisted("user.max_user_namespaces=28633"),
            )
        )
    if _sysctl("kernel/unprivileged_userns_clone", sysctl) == 0:
        found.append(
            Problem(
                "unprivileged user namespaces are off (kernel.unprivileged_userns_clone = 0)",
                _persisted("kernel.unprivileged_userns_clone=1"),
            )
        )
    if _sysctl("kernel/apparmor_restrict_unprivileged_userns", sysctl) == 1:
        found.append(
            Problem(
                "AppArmor restricts unprivileged user namespaces "
                "(kernel.apparmor_restrict_unprivileged_userns = 1)",
                _persisted("kernel.apparmor_restrict_unprivileged_userns=0")
                + ", or an AppArmor profile granting `userns,` to unshare and slirp4netns",
            )
        )
    return [*found, *_tun_problems(tun)]


def _tun_problems(tun: Path) -> list[Problem]:
    try:
        mode = stat.filemode(tun.stat().st_mode)
    except OSError:
        return [Problem(f"{tun} does not exist (slirp4netns needs it)", "sudo modprobe tun")]
    if not os.access(tun, os.R_OK | os.W_OK):
        return [
            Problem(
                f"{tun} is {mode}: this user cannot open it (slirp4netns needs it)",
                f"sudo chmod 0666 {tun} (the mode distributions ship; keep it with a udev "
                'rule: KERNEL=="tun", MODE="0666")',
            )
        ]
    return []


def required_tools(is_rootless: bool) -> tuple[str, ...]:
    """The programs ``user`` networking runs (as root, or on the user-namespace path)."""
    return (*HOST_TOOLS, "socat", *(ROOTLESS_TOOLS if is_rootless else ()))


def missing_tools(names: Iterable[str]) -> tuple[str, ...]:
    missing = []
    for tool in names:
        try:
            runner.find_tool(tool)
        except ToolError:
            missing.append(tool)
    return tuple(missing)


def network_problems() -> list[Problem]:
    """What keeps ``user`` networking from working for this user ([] when nothing does)."""
    is_rootless = rootless()
    found = []
    missing = missing_tools(required_tools(is_rootless))
    if missing:
        packages = " ".join(sorted({runner.PACKAGES.get(t, t) for t in missing}))
        found.append(
            Problem(f"missing {', '.join(missing)}", f"apt-get install {packages}", missing)
        )
    if is_rootless:
        found.extend(userns_problems())
    return found


def probe_userns() -> str:
    """Make (and drop) the rootless namespaces once: '' when that works, else why not (what
    the static checks cannot see: seccomp or a security module refusing, for instance)."""
    try:
        unshare = runner.find_tool("unshare")
    except ToolError as exc:
        return exc.message
    argv = [unshare, "--user", "--map-root-user", "--net", "--mount", "--", "true"]
    done = runner.run(argv, check=False, timeout=10)
    if done.returncode == 0:
        return ""
    return f"`{shlex.join(argv[1:])}` failed: {done.stderr.strip()[-300:] or done.returncode}"


def user_network_problem() -> str:
    """Why ``user`` networking cannot be set up here ('' when it can)."""
    return "; ".join(p.what for p in network_problems())


class NamedNetns:
    """As root: a named namespace under /run/netns (``ip netns``); its resolv.conf, when one
    is needed, in /etc/netns/<name>/ (``ip netns exec`` mounts it)."""

    def __init__(self) -> None:
        self.name = netns_name()
        self._created = False
        self._resolv_dir: Path | None = None

    def create(self, resolv_conf: str | None) -> None:
        cleanup_stale()
        runner.run(["ip", "netns", "add", self.name])
        self._created = True
        runner.run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        if resolv_conf:
            self._resolv_dir = Path("/etc/netns") / self.name
            self._resolv_dir.mkdir(parents=True, exist_ok=True)
            (self._resolv_dir / "resolv.conf").write_text(resolv_conf)

    def enter(self, argv: Sequence[str]) -> list[str]:
        return netns_exec(self.name, argv)

    def slirp_target(self) -> tuple[str | Path, Path | None]:
        """slirp4netns's namespace argument and user namespace (none: root needs none)."""
        return self.name, None

    def delete(self) -> None:
        if self._created:
            runner.run(["ip", "netns", "del", self.name], check=False)
            self._created = False
        if self._resolv_dir is not None:
            for child in self._resolv_dir.glob("*"):
                child.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self._resolv_dir.rmdir()
            self._resolv_dir = None


class UserNetns:
    """As a normal user: a user namespace with a network and a mount namespace, owned by a
    holder process (:func:`holder_argv`); helpers enter it with nsenter. The resolv.conf,
    when one is needed, is bind-mounted over /etc/resolv.conf in the mount namespace."""

    PLACEHOLDER = "<holder-pid>"  # in an argv shown before the holder exists (--print-command)

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self._holder: subprocess.Popen[bytes] | None = None
        self._nsenter = "nsenter"

    def create(self, resolv_conf: str | None) -> None:
        tools = [runner.find_tool(t) for t in ("setpriv", "unshare", HOLDER_COMMAND)]
        self._nsenter = runner.find_tool("nsenter")
        log = self.state_dir / "netns.log"
        self._holder = runner.spawn(holder_argv(*tools), stdout=log)
        _await_holder(self._holder, log)
        runner.run(self.enter(["ip", "link", "set", "lo", "up"]))
        if resolv_conf:
            resolv = self.state_dir / "resolv.conf"
            resolv.write_text(resolv_conf)
            runner.run(self.enter(["mount", "--bind", str(resolv), "/etc/resolv.conf"]))

    def enter(self, argv: Sequence[str]) -> list[str]:
        pid = self._holder.pid if self._holder is not None else self.PLACEHOLDER
        return nsenter_argv(self._nsenter, pid, argv)

    def slirp_target(self) -> tuple[str | Path, Path | None]:
        if self._holder is None:
            raise VMError("the namespace holder is not running")
        proc = Path(f"/proc/{self._holder.pid}/ns")
        return proc / "net", proc / "user"

    def delete(self) -> None:
        """Stop the holder: with its last process gone, the namespaces go too."""
        if self._holder is not None:
            _stop(self._holder)
            self._holder = None
        (self.state_dir / "resolv.conf").unlink(missing_ok=True)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _await_holder(holder: subprocess.Popen[bytes], log: Path) -> None:
    """Wait until the holder runs its command: unshare made the namespaces and the uid map."""
    deadline = time.monotonic() + READY_TIMEOUT
    while _comm(holder.pid) != HOLDER_COMMAND:
        if holder.poll() is not None or time.monotonic() > deadline:
            fixes = "; ".join(p.fix for p in userns_problems())
            raise VMError(
                "could not create a user namespace for the VM's network "
                f"(unshare --user --map-root-user --net): {tail_text(log, 5) or 'no output'}",
                hint=fixes or "check that unprivileged user namespaces are enabled",
            )
        time.sleep(0.005)


class NetworkSandbox:
    """The namespace, filter, slirp4netns and forward bridges of one VM (context manager)."""

    def __init__(self, config: NetworkConfig, state_dir: Path) -> None:
        self.config = config
        self.state_dir = state_dir
        self._ns: NamedNetns | UserNetns = UserNetns(state_dir) if rootless() else NamedNetns()
        self._slirp: subprocess.Popen[bytes] | None = None
        self._exit_fd: int | None = None
        self._bridges: list[subprocess.Popen[bytes]] = []
        self._relays: list[subprocess.Popen[bytes]] = []

    @property
    def enabled(self) -> bool:
        return self.config.mode is NetworkMode.USER

    @property
    def api_socket(self) -> Path | None:
        """slirp4netns's API socket; only when there are ports to publish."""
        return api_socket_path(self.state_dir) if self.config.published else None

    def __enter__(self) -> NetworkSandbox:
        try:
            self.setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def setup(self) -> None:
        """Create everything; raises VMError (after undoing partial work in teardown)."""
        if not self.enabled:
            if self.config.forwards:
                raise VMError("forwards need network mode 'user'")
            if self.config.published:
                raise VMError("published ports need network mode 'user'")
            return
        problems = network_problems()
        if problems:
            fixes = "; ".join(p.fix for p in problems)
            raise VMError(
                "network mode 'user' is unavailable: " + "; ".join(p.what for p in problems),
                hint=f"{fixes}; or use --network isolated (`microagent doctor` checks this)",
            )
        check_published(self.config.published)  # before anything is made: nothing to undo
        self._create_netns()
        self._start_slirp()
        self._start_relays()
        self._publish()
        self._start_bridges()

    def _create_netns(self) -> None:
        policy = self._policy()
        self._ns.create(policy.netns_resolv_conf)
        rules = iptables_rules(policy).encode()
        runner.run(self._ns.enter(["iptables-restore"]), input=rules)
        if HOST_IPV6.exists():  # no IPv6 in the kernel: nothing to filter
            v6 = ip6tables_rules().encode()
            runner.run(self._ns.enter(["ip6tables-restore"]), input=v6)

    def _policy(self) -> EgressPolicy:
        try:
            resolv = Path("/etc/resolv.conf").read_text()
        except OSError:
            resolv = ""
        addrs = runner.run(["ip", "-4", "-o", "addr", "show"]).stdout
        ports = netns_ports(self.config.published)
        return egress_policy(
            parse_resolvers(resolv),
            parse_host_addresses(addrs),
            ports,
            direct_egress=self.config.direct_egress,
        )

    def _start_slirp(self) -> None:
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        log = self.state_dir / "slirp4netns.log"
        api = self.api_socket
        if api is not None:
            api.unlink(missing_ok=True)
        try:
            binary = runner.find_tool("slirp4netns")
            target, userns = self._ns.slirp_target()
            argv = slirp4netns_argv(binary, target, ready_w, exit_r, api, userns=userns)
            self._slirp = runner.spawn(argv, stdout=log, pass_fds=(ready_w, exit_r))
        finally:
            os.close(ready_w)
            os.close(exit_r)
        self._exit_fd = exit_w
        try:
            byte = _read_ready(ready_r, READY_TIMEOUT)
        finally:
            os.close(ready_r)
        if byte != b"1" or self._slirp.poll() is not None:
            raise VMError(
                f"slirp4netns did not become ready (got {byte!r})",
                hint=f"its log: {tail_text(log, 10) or '(empty)'}",
            )

    def _start_relays(self) -> None:
        socat, setpriv = runner.find_tool("socat"), runner.find_tool("setpriv")
        for port in netns_ports(self.config.published):
            log = self.state_dir / f"publish-{port}.log"
            # It never outlives the process that set the namespace up (its children end with
            # their connections, which end with the VMM); a teardown stops its whole session.
            argv = [setpriv, "--pdeathsig", "KILL", *self._ns.enter(relay_argv(socat, port))]
            self._relays.append(runner.spawn(argv, stdout=log, new_session=True))
            _await_listening(self._relays[-1], port, log)

    def _publish(self) -> None:
        api = self.api_socket
        for port in self.config.published:
            assert api is not None  # there are published ports
            publish(api, port)

    def _start_bridges(self) -> None:
        socat = runner.find_tool("socat")
        for forward in self.config.forwards:
            if forward.unix_socket is not None:
                continue
            if forward.host_port is None:
                raise VMError(f"forward {forward.guest_port} has no host target")
            path = forward_socket(self.state_dir, forward)
            log = self.state_dir / f"fwd-{forward.guest_port}.log"
            self._bridges.append(
                runner.spawn(bridge_argv(socat, path, forward.host_port), stdout=log)
            )
            _wait_for_socket(path, self._bridges[-1], log)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The VMM argv, run inside the namespace when networking is on (on the rootless path
        the holder's pid is known only after :meth:`setup`)."""
        return self._ns.enter(argv) if self.enabled else list(argv)

    def teardown(self) -> None:
        """Stop helpers and delete the namespace; safe to call more than once."""
        for relay in self._relays:
            _stop_group(relay)
        self._relays = []
        for proc in [*self._bridges, *([self._slirp] if self._slirp else [])]:
            _stop(proc)
        if self._slirp is not None and self.api_socket is not None:
            self.api_socket.unlink(missing_ok=True)  # its listeners went with it
        self._bridges = []
        self._slirp = None
        if self._exit_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._exit_fd)
            self._exit_fd = None
        self._ns.delete()


def _read_ready(fd: int, timeout: float) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, 1) if ready else b""


def _await_listening(relay: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not listening(relay.pid, NETNS_ADDRESS, port):
        if relay.poll() is not None or time.monotonic() > deadline:
            raise VMError(
                f"the relay for guest port {port} did not start",
                hint=f"its log: {tail_text(log, 10) or '(empty)'}",
            )
        time.sleep(0.005)


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 5.0
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise VMError(
                f"forward bridge on {path} did not start",
                hint=f"its log: {tail_text(log, 10) or '(empty)'}",
            )
        time.sleep(0.005)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a session leader and what it forked (a relay's per-connection children)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    _stop(proc)


def cleanup_stale() -> list[str]:
    """Delete namespaces left by microagent processes that died without cleaning up."""
    try:
        names = [p.name for p in NETNS_DIR.iterdir()]
    except OSError:
        return []
    stale = stale_namespaces(names)
    for name in stale:
        runner.run(["ip", "netns", "del", name], check=False)
    return stale
