"""Warm templates (issue 18): a workspace that resumes a saved, ready VM instead of booting.

``create --warm`` (or ``warm: true`` in the spec) looks up the spec's template in the store,
``templates/<hex>/``, by its **template key**: sha256 of everything a restore must match
(:func:`key_inputs`: the backend and VMM version, accelerator setting, host CPU, guest kernel
and initramfs digests, root filesystem key, and the guest-visible part of the workspace
record: entrypoint, environment, files, memory, vCPUs, disks, network, the mediation's guest
port, health, credentials' variables). Then:

- **hit**: the new workspace gets the template's snapshot as its own ``template`` snapshot
  (hard links: the files are never written once published) and waits ``suspended``;
  ``start`` checks it (digests, and the VM shape against the one it would boot now) and
  resumes it (events ``warm-start``, ``restore``, ``restored``). A file's digest is taken
  once per version of the file: the template is verified at the fork by its stamps, which
  the hard links carry into the workspace (runtime.stamps), so neither the fork nor the
  start reads the VM state unless a file changed. The workspace's own state
  disk stays fresh until then: the restore puts the template's disk copy in place.
- **miss**: the new workspace boots cold once until it is ready (the ``health`` probe passes,
  or the guest agent answers when the spec has no probe), is snapshotted and stopped
  (``suspended``, like a hit), and the snapshot is published as the template (an atomic
  rename under the entry's lock; a concurrent create of the same key reuses the first).
  Meanwhile the host holds the mediation channel itself (runtime.agentlink, a held target):
  the agent's connection is accepted and left silent, nothing is forwarded and the real
  target is neither contacted nor required to listen, so no dispatcher takes (and loses)
  requests with the template's boot. Each fork's start reaches the real target, checked
  (fail closed) like any start.

A template that cannot be used is refused with the reason and the workspace boots cold,
visibly: at create (a template whose files are missing or do not match their digests:
removed, and this create makes it anew) and at start (a digest or VM-shape mismatch, say a
file changed after the fork: event ``warm-start-refused``, a notice, the workspace's copy and
a corrupt store template removed, then a cold boot, event ``cold``).

Secrets: a template holds no runtime secrets. ``--env`` values are refused with ``--warm``
(the running agent could never see values given after its start); a credential's key stays
in the host's broker and the guest only ever sees its placeholder and the broker's address,
so each workspace resumed from a template gets its key through its own broker, started with
it. The template's memory therefore holds only what the spec and image hold.

A workspace whose hostname is the default one (made from its name) shares the template of
its spec: the key leaves that hostname out, and a start that resumes a template made under
another name sets the guest's hostname through the guest agent (event ``hostname``).
Likewise the mediation's target address and ``required`` are the host's alone (the guest
knows only its port, ``MICROAGENT_MEDIATION_ADDR``): forks of one template may each reach
another dispatcher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent.compiler.overrides import RuntimeEnv
from microagent.compiler.spec import default_hostname
from microagent.digests import canonical_json
from microagent.errors import InvalidInputError, MicroagentError, NotFoundError, VMError
from microagent.fsutil import flocked, remove_any, write_json_atomic
from microagent.runtime import snapshot
from microagent.runtime.rundir import State, now
from microagent.runtime.snapshot import file_sha256
from microagent.settings import Settings
from microagent.store.content import Store
from microagent.workspace import lifecycle, snapshots
from microagent.workspace.liveness import reconcile
from microagent.workspace.records import Record, Workspace
from microagent.workspace.snapshots import TEMPLATE_TAG, link_files
from microagent.workspace.snapshots import template_entry as entry_name

INFO = "template.json"
FORMAT = 1
READY_TIMEOUT = 900.0  # seconds a template's first boot may take to be ready (TCG, SDKs)
POLL = 0.2
# record fields that never reach the guest (host paths, names, policy, the secrets)
HOST_ONLY = (
    "name", "rootfs", "image", "spec", "created_at", "runtime_env", "published", "restart",
    "template", "version", "rootfs_layers",
    "config_key", "files_key",  # step keys: the name (hostname) is in them; their inputs are here
)  # fmt: skip
Say = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


# -- the key ------------------------------------------------------------------------------------


def guest_config(record: Record) -> dict[str, Any]:
    """The part of a workspace record its guest sees (what a template's memory depends on)."""
    data = {k: v for k, v in record.to_json().items() if k not in HOST_ONLY}
    data["disks"] = [
        {k: v for k, v in disk.items() if k != "source"} for disk in data.get("disks") or []
    ]
    if record.hostname == default_hostname(record.name):
        data["hostname"] = ""  # made from the name: set after the restore instead
    if record.mediation is not None:  # the target is the host's: the guest sees the port
        data["mediation"] = {"port": record.mediation.port}
    return data


def host_cpu() -> str:
    """The host's CPU model (a restore under KVM needs the same), e.g. ``x86_64 AMD EPYC``."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return f"{platform.machine()} {model}".strip()


def key_inputs(
    settings: Settings, vmm: str, kernel: Path, initrd: Path, record: Record
) -> dict[str, Any]:
    """Everything a template's restore must match, as one canonical document."""
    ca = settings.extra_ca_bundle()
    book = snapshots.kit_book(settings)
    return {
        "format": FORMAT,
        "backend": settings.backend,
        "vmm": vmm,
        "accel": settings.accel,
        "hostCpu": host_cpu(),
        "kernel": file_sha256(kernel, book),
        "initrd": file_sha256(initrd, book),
        "rootfsKey": record.rootfs_key,
        # how the root is laid out: the guest's memory holds its disks' caches
        "rootfsImages": [Path(p).name for p in (record.rootfs, *record.rootfs_layers)],
        "servicePortBase": settings.service_port_base,
        "extraCa": hashlib.sha256(ca).hexdigest() if ca else None,
        "guest": guest_config(record),
    }


def template_key(inputs: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(inputs)).hexdigest()


def short(key: str) -> str:
    return key.removeprefix("sha256:")[:12]


def refuse_runtime_env(env: RuntimeEnv) -> None:
    """``--env`` values cannot go into a warm workspace: refused, with the way to pass keys."""
    if env.values:
        names = ", ".join(sorted(env.values))
        raise InvalidInputError(
            f"--env {names}: a warm workspace resumes an agent that is already running, "
            "which never sees values given after its start, and a template holds no "
            "runtime secrets",
            hint="declare the key as a credential (`credentials:` in the spec: the host's "
            "broker adds it to each call after the fork), put non-secret values in the "
            "spec's `env`, or create without --warm",
        )


# -- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WarmReport:
    key: str
    made: bool  # this create booted the template (a miss); False: forked from it (a hit)
    seconds: float  # the boot to ready + snapshot (made), or the fork
    ready_seconds: float = 0.0  # made: the cold boot until ready
    refused: str = ""  # why a stored template was refused (then made anew)
    error: str = ""  # the template could not be made: the workspace stays cold

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key,
            "made": self.made,
            "seconds": round(self.seconds, 3),
        }
        if self.made:
            out["readySeconds"] = round(self.ready_seconds, 3)
        if self.refused:
            out["refused"] = self.refused
        if self.error:
            out["error"] = self.error
        return out


# -- create --warm ------------------------------------------------------------------------------


def compute_key(rt: lifecycle.Runtime, ws: Workspace) -> str:
    kit = rt.kit()
    backend = snapshots.backend_of(rt.settings)
    return template_key(
        key_inputs(rt.settings, backend.vmm_version(), kit.kernel, kit.initrd, ws.record())
    )


def warm(
    rt: lifecycle.Runtime, ws: Workspace, *, say: Say = _quiet, timeout: float = READY_TIMEOUT
) -> WarmReport:
    """Make the just-created (``prepared``) workspace ``ws`` warm: a fork of its template,
    made first (a cold boot until ready) when the store has none."""
    began = time.monotonic()
    key = compute_key(rt, ws)
    store = rt.store
    name = entry_name(key)
    refused = ""
    if store.has_entry(name):
        try:
            fork_template(store, name, ws, key)
        except MicroagentError as exc:
            refused = exc.message
            say(f"template {short(key)} refused: {refused}; making it anew (a cold boot)")
            ws.run.event("template-refused", refused, template=key)
            store.remove(name)
        else:
            return WarmReport(key, False, time.monotonic() - began)
    return make_template(rt, ws, key, say=say, timeout=timeout, refused=refused)


def fork_template(store: Store, name: str, ws: Workspace, key: str) -> None:
    """Give ``ws`` the stored template's snapshot (hard links) and leave it ``suspended``.
    The template is verified first, from its stamps while its files are unchanged (a file
    that changed is hashed, and stamped again); the links carry the stamps into the
    workspace, so its start hashes nothing. The entry's lock is held meanwhile: a ``cache
    prune`` skips it."""
    folder = store.entry_path(name)
    with flocked(store.lock_path(name)):
        if not folder.is_dir():
            raise NotFoundError(f"template {short(key)} is gone from the cache")
        info = read_info(folder)
        if info.get("key") != key:
            raise InvalidInputError(f"its {INFO} names another key")
        manifest = snapshot.read_manifest(folder, TEMPLATE_TAG)
        snapshot.verify(folder, manifest)  # by its stamps: hashed once per version of a file
        source = snapshot.snapshot_path(folder, TEMPLATE_TAG).resolve()
        copy = snapshot.begin(ws.root, TEMPLATE_TAG)
        try:
            link_files(source, copy, manifest)
            snapshot.publish(ws.root, TEMPLATE_TAG, copy, manifest)
        except BaseException:
            remove_any(copy)
            raise
        store.touch(name)
    _mark(ws, key, str(info.get("hostname") or ""))
    ws.run.set_state(
        State.SUSPENDED, f"warm: forked from template {short(key)}", suspendedTag=TEMPLATE_TAG
    )
    ws.run.event("warm-create", f"forked from template {short(key)}", template=key)


def read_info(folder: Path) -> dict[str, Any]:
    try:
        data = snapshot.read_json_file(folder / INFO)
    except OSError as exc:
        raise InvalidInputError(f"its {INFO} is unreadable ({exc.strerror or exc})") from exc
    except InvalidInputError as exc:
        raise InvalidInputError(f"its {INFO} is unreadable ({exc.message})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidInputError(f"its {INFO} is not a format {FORMAT} template record")
    return data


def _mark(ws: Workspace, key: str, hostname: str) -> None:
    """Record the template in the workspace's record (``status`` shows it) and the hostname
    its guest had (a start sets this workspace's own after the restore)."""
    record = dataclasses.replace(ws.record(), template=key)
    write_json_atomic(ws.record_path, record.to_json(), mode=0o600)
    ws.run.update(templateHostname=hostname)


def make_template(
    rt: lifecycle.Runtime,
    ws: Workspace,
    key: str,
    *,
    say: Say,
    timeout: float,
    refused: str = "",
) -> WarmReport:
    """Boot ``ws`` cold until ready, snapshot and stop it, publish that as template ``key``.
    A boot that never gets ready leaves the workspace halted and cold (``error``)."""
    began = time.monotonic()
    say(f"template {short(key)}: booting the workspace once until it is ready")
    try:
        lifecycle.start(rt, ws, hold_mediation=True)  # no dispatcher gets the boot's requests
        wait_ready(ws, timeout)
        ready = time.monotonic() - began
        snapshots.create(rt.settings, ws, TEMPLATE_TAG, stop=True)
    except MicroagentError as exc:
        with contextlib.suppress(MicroagentError):
            lifecycle.halt(ws)
        say(f"template {short(key)} not made: {exc.message}; the workspace boots cold")
        ws.run.event("template-failed", exc.message, template=key)
        return WarmReport(key, True, time.monotonic() - began, refused=refused, error=exc.message)
    publish(rt.store, key, ws)
    _mark(ws, key, ws.record().hostname)
    ws.run.event("template-made", f"template {short(key)} ready in {ready:.1f}s", template=key)
    return WarmReport(key, True, time.monotonic() - began, ready, refused)


def ready_now(ws: Workspace, record: Record) -> tuple[bool, str]:
    """Whether the running workspace is ready for a template, and the state/detail if it
    ended instead (empty while it runs)."""
    state = reconcile(ws)
    runtime = ws.run.runtime()
    if not state.live:
        return False, f"{state.value}: {runtime.get('detail') or ''}".strip()
    if state is not State.RUNNING:
        return False, ""
    if record.health is not None:
        health = runtime.get("health")
        return isinstance(health, Mapping) and health.get("ready") is True, ""
    return bool(runtime.get("execReadyAt")), ""


def wait_ready(ws: Workspace, timeout: float) -> None:
    """Until the health probe passes (or, without one, the guest agent answers)."""
    record = ws.record()
    what = "its health probe to pass" if record.health else "its guest agent to answer"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, ended = ready_now(ws, record)
        if ready:
            return
        if ended:
            raise VMError(
                f"workspace {ws.name!r} ended before it was ready ({ended})",
                hint="a warm template needs an entrypoint that keeps running (a server, "
                "an agent in serve mode); see `microagent logs " + ws.name + "`",
            )
        time.sleep(POLL)
    raise VMError(f"workspace {ws.name!r}: no {what} within {timeout:.0f}s")


def publish(store: Store, key: str, ws: Workspace) -> Path:
    """The workspace's ``template`` snapshot as store entry ``templates/<hex>`` (hard
    links), with ``template.json``; an existing entry of the key is kept."""
    manifest = snapshot.read_manifest(ws.root, TEMPLATE_TAG)
    source = snapshot.snapshot_path(ws.root, TEMPLATE_TAG).resolve()
    info = {
        "format": FORMAT,
        "key": key,
        "createdAt": now(),
        "hostname": ws.record().hostname,
        "madeBy": ws.name,
        "bytes": manifest.size,
    }

    def build(tmp: Path) -> None:
        tmp.mkdir(mode=0o700)
        copy = snapshot.begin(tmp, TEMPLATE_TAG)
        link_files(source, copy, manifest)
        snapshot.publish(tmp, TEMPLATE_TAG, copy, manifest)
        write_json_atomic(tmp / INFO, info, mode=0o600)

    return store.build_once(entry_name(key), build)


def problem(folder: Path) -> tuple[str, str] | None:
    """``cache verify``'s check of a stored template: its record, manifest and every file's
    size and digest."""
    try:
        read_info(folder)
        manifest = snapshot.read_manifest(folder, TEMPLATE_TAG)
        snapshot.verify(folder, manifest, trust_stamps=False)  # every byte, whatever the stamps
    except MicroagentError as exc:
        return "corrupt", exc.message[:300]
    return None
