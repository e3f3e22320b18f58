"""Pause, resume, snapshots and suspend of a workspace (the file format: runtime.snapshot).

- ``pause``/``resume`` freeze and thaw the VM's vCPUs over the VMM's QMP socket (state
  ``paused``); after a resume the guest's clock is set to the host's through the guest agent
  (it stood still while the vCPUs did).
- ``snapshot create`` stops the vCPUs, has the VMM write its memory and device state, copies
  every disk the VM writes (the state disk, rw disk copies) while nothing can change them,
  lets the VM run on (the digests and the publication read only the files), and publishes
  the snapshot atomically (``snapshots/<tag>`` in the workspace's folder); with ``stop``
  (``suspend``) it tells the VMM to quit instead, once published: the supervisor then ends
  the run ``suspended``.
- ``start`` of a suspended workspace, or ``start --from TAG``, checks the snapshot (manifest,
  every file's digest, the VM shape it was made by against the one a start would boot now),
  puts the saved disks back and has the supervisor load the saved state instead of booting.

Every operation holds the workspace's start lock, so snapshots, pauses and starts never
interleave. Secrets: the memory image holds the guest's environment (``--env`` values), so a
snapshot never leaves the workspace's folder; ``delete`` removes it with the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent.errors import ConflictError, MicroagentError, NotFoundError, VMError
from microagent.fsutil import flocked, remove_any, write_json_atomic
from microagent.runtime import qmp, snapshot, stamps
from microagent.runtime.backend import BootConfig
from microagent.runtime.backends import get_backend
from microagent.runtime.rundir import State, now
from microagent.runtime.snapshot import (
    Identity,
    Manifest,
    RestoringBackend,
    SavedFile,
    clock_request,
    copy_disk,
    disk_file,
    make_identity,
    restoring,
)
from microagent.settings import Settings
from microagent.store.content import Store
from microagent.workspace.execs import run_exec
from microagent.workspace.liveness import reconcile, seconds_since
from microagent.workspace.records import Workspace, Workspaces

START_LOCK = ".start.lock"  # lifecycle's: one start, pause, resume or snapshot at a time
SUSPEND_TAG = "suspended"
TEMPLATE_TAG = "template"  # a warm workspace's copy of its template (workspace.templates)
TEMPLATES_KIND = "templates"  # the store's kind of template entries: templates/<hex>
KIT_BOOK = "verified.json"  # in the home: stamps of the guest kernels and initramfs files
SUSPEND_WAIT = 30.0  # seconds for the supervisor to record ``suspended`` after the VMM quit
CLOCK_WAIT = 5.0  # seconds a resume waits for the guest agent before setting the clock
POLL = 0.1


@dataclass(frozen=True)
class SnapshotReport:
    workspace: str
    tag: str
    state: str
    bytes: int
    state_bytes: int
    seconds: float  # the vCPUs stood still this long (save + disk copies)
    path: Path
    disk_bytes: int = 0  # what the snapshot takes on the host's disk (holes, shared extents not)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "workspace": self.workspace,
            "tag": self.tag,
            "state": self.state,
            "bytes": self.bytes,
            "stateBytes": self.state_bytes,
            "seconds": round(self.seconds, 3),
            "path": str(self.path),
            "diskBytes": self.disk_bytes,
        }


@contextmanager
def _exclusive(ws: Workspace, verb: str) -> Iterator[None]:
    with flocked(ws.run.path / START_LOCK, blocking=False) as mine:
        if not mine:
            raise ConflictError(
                f"cannot {verb}: workspace {ws.name!r} is being started, paused or "
                "snapshotted by another command",
                hint=f"try again in a moment (`microagent status {ws.name}`)",
            )
        yield


def _vm_dir(ws: Workspace) -> Path:
    vm_dir = ws.run.runtime().get("vmDir")
    if not isinstance(vm_dir, str):
        raise VMError(f"workspace {ws.name!r} has no VM directory recorded")
    return Path(vm_dir)


def _not_running(ws: Workspace, verb: str, state: State) -> ConflictError:
    hint = {
        State.PAUSED: f"`microagent resume {ws.name}` first",
        State.SUSPENDED: f"`microagent start {ws.name}` resumes it",
    }.get(state, f"`microagent start {ws.name}` first")
    return ConflictError(f"cannot {verb}: workspace {ws.name!r} is {state.value}", hint=hint)


# -- pause / resume -----------------------------------------------------------------------------


def pause(ws: Workspace) -> State:
    """Freeze the VM's vCPUs (``paused``); a paused workspace stays paused."""
    with _exclusive(ws, "pause"):
        state = reconcile(ws)
        if state is State.PAUSED:
            return state
        if state is not State.RUNNING:
            raise _not_running(ws, "pause", state)
        qmp.stop(_vm_dir(ws))
        ws.run.set_state(State.PAUSED, "paused", pausedAt=now())
    return State.PAUSED


def resume(ws: Workspace) -> tuple[State, str]:
    """Thaw a paused VM and set the guest's clock; the state and what became of the clock."""
    with _exclusive(ws, "resume"):
        state = reconcile(ws)
        if state is State.RUNNING:
            return state, "not paused"
        if state is not State.PAUSED:
            raise _not_running(ws, "resume", state)
        paused = seconds_since(ws.run.runtime().get("pausedAt"))
        qmp.cont(_vm_dir(ws))
        detail = "resumed" + (f" after {paused}s paused" if paused is not None else "")
        ws.run.set_state(State.RUNNING, detail, pausedAt=None)
    return State.RUNNING, resync_clock(ws)


def thaw(ws: Workspace) -> None:
    """Let a paused VM run again before it is halted (best effort: a halt escalates)."""
    try:
        qmp.cont(_vm_dir(ws))
    except MicroagentError as exc:
        ws.run.event("resume-failed", f"before the halt: {exc.message}")


def resync_clock(ws: Workspace) -> str:
    """Set the guest's clock to the host's through the guest agent; what happened (event
    ``clock``). A guest without an agent keeps its clock: that costs the clock only."""
    try:
        done = run_exec(ws, clock_request(), timeout=15.0, wait=CLOCK_WAIT)
    except MicroagentError as exc:
        outcome = f"the guest clock was not set: {exc.message}"
    else:
        outcome = "guest clock set to the host's"
        if done.exit_code != 0:
            outcome = f"the guest clock was not set (exit code {done.exit_code})"
    ws.run.event("clock", outcome)
    return outcome


# -- snapshot create ----------------------------------------------------------------------------


def backend_of(settings: Settings) -> RestoringBackend:
    backend = get_backend(
        settings.backend, probes_dir=settings.probes_dir, fake_outcome=settings.fake_outcome
    )
    return restoring(backend)


def _written_disks(ws: Workspace) -> list[tuple[Path, str]]:
    """The disk images the VM writes, with the name a snapshot gives each copy."""
    disks = [(ws.state_disk, "state")]
    for disk in ws.record().disks:
        copy = ws.disk_copy(disk.name)
        if not disk.readonly and not disk.entry and copy.is_file():
            disks.append((copy, disk.name))
    return disks


def kit_book(settings: Settings) -> stamps.Book:
    """The stamps of the guest kit's files (kernel, initramfs): hashed once per version of
    each, not at every start and warm create (see runtime.stamps)."""
    return stamps.Book(settings.home / KIT_BOOK)


def current_identity(settings: Settings, ws: Workspace) -> Identity:
    """The identity of the VM running now (its recorded argv and boot files)."""
    runtime = ws.run.runtime()
    argv = runtime.get("vmmArgv")
    config = ws.run.read_boot().config
    return make_identity(
        backend_of(settings).vmm_version(),
        [str(w) for w in argv] if isinstance(argv, list) else [],
        config.kernel,
        config.initrd,
        ws.record().rootfs_key,
        book=kit_book(settings),
    )


def create(settings: Settings, ws: Workspace, tag: str, *, stop: bool = False) -> SnapshotReport:
    """Save the running (or paused) workspace as snapshot ``tag``; with ``stop`` the VM
    quits afterwards and the workspace is ``suspended``."""
    snapshot.check_tag(tag)
    with _exclusive(ws, "take a snapshot"):
        state = reconcile(ws)
        if state not in (State.RUNNING, State.PAUSED):
            raise _not_running(ws, "take a snapshot", state)
        identity = current_identity(settings, ws)
        snapshot.collect_garbage(ws.root)
        vm_dir, was_paused = _vm_dir(ws), state is State.PAUSED
        began = time.monotonic()
        if not was_paused:
            qmp.stop(vm_dir)
            ws.run.set_state(State.PAUSED, f"taking snapshot {tag}", pausedAt=now())
        run_on = _RunOn(ws, vm_dir, tag, early=not was_paused and not stop)
        try:
            manifest = _write(
                ws, tag, identity, vm_dir, was_paused=was_paused, began=began, saved=run_on
            )
        except BaseException:
            if not was_paused and not run_on.running:  # the snapshot's own error is the one
                with contextlib.suppress(MicroagentError):
                    _run_on(ws, vm_dir, f"snapshot {tag} failed")
            raise
        path = snapshot.snapshot_path(ws.root, tag)
        detail = f"snapshot {tag}: {manifest.size} bytes in {manifest.seconds:.2f}s"
        ws.run.event("snapshot", detail, tag=tag, bytes=manifest.size, seconds=manifest.seconds)
        if stop:
            final = _quit_suspended(ws, vm_dir, tag)
        elif was_paused:
            final = State.PAUSED
        else:
            final = run_on.finish()
    if final is State.RUNNING:
        resync_clock(ws)
    used = sum(f.stat().st_blocks * 512 for f in path.resolve().iterdir())
    return SnapshotReport(
        ws.name, tag, final.value, manifest.size, manifest.state.size, manifest.seconds, path, used
    )


@dataclass
class _RunOn:
    """Lets a VM stopped for a snapshot run on as soon as its state and disks are saved
    (``early``: it was running and is not being suspended): the digests and the publication
    that follow read only the files, so the vCPUs stand still for the save alone."""

    ws: Workspace
    vm_dir: Path
    tag: str
    early: bool
    running: bool = False
    error: MicroagentError | None = None

    def __call__(self) -> None:
        if self.early and not self.running:
            try:
                _run_on(self.ws, self.vm_dir, f"snapshot {self.tag} saved, running on")
            except MicroagentError as exc:
                self.error = exc  # raised once the snapshot is published (see finish)
            else:
                self.running = True

    def finish(self) -> State:
        """The state after a published snapshot (the VM runs on); the VMM's error if it
        could not."""
        if not self.running:
            self.error = None
            self()
        if self.error is not None:
            raise self.error
        return State.RUNNING


def _run_on(ws: Workspace, vm_dir: Path, detail: str) -> State:
    qmp.cont(vm_dir)
    ws.run.set_state(State.RUNNING, detail, pausedAt=None)
    return State.RUNNING


def _write(
    ws: Workspace,
    tag: str,
    identity: Identity,
    vm_dir: Path,
    *,
    was_paused: bool,
    began: float,
    saved: _RunOn,
) -> Manifest:
    """Save the stopped VM into a temp folder and publish it as ``tag``; ``saved`` is
    called once the VM state and the disk copies are written."""
    tmp = snapshot.begin(ws.root, tag)
    try:
        state_path = tmp / snapshot.STATE_FILE
        fd = os.open(state_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            qmp.save_state(vm_dir, fd)
        finally:
            os.close(fd)
        disks = []
        for source, name in _written_disks(ws):
            target = tmp / disk_file(name)
            copy_disk(source, target)
            disks.append(SavedFile(target.name, target.stat().st_size, "", name))
        seconds = time.monotonic() - began  # the vCPUs may run on from here
        saved()
        book = stamps.Book.of_folder(tmp)  # what is hashed now need not be at the restore
        state = SavedFile(
            state_path.name, state_path.stat().st_size, _digest(state_path, snapshot.PLAIN, book)
        )
        disks = [
            SavedFile(d.file, d.size, _digest(tmp / d.file, snapshot.SPARSE, book), d.disk)
            for d in disks
        ]
        manifest = Manifest(tag, now(), identity, state, tuple(disks), seconds, was_paused)
        snapshot.publish(ws.root, tag, tmp, manifest)
    except BaseException:
        remove_any(tmp)
        raise
    return manifest


def _digest(path: Path, algorithm: str, book: stamps.Book) -> str:
    """The digest of a file this save just wrote, stamped (no other process has it)."""
    return stamps.digest(path, algorithm, book, wait=True)


def _quit_suspended(ws: Workspace, vm_dir: Path, tag: str) -> State:
    """Tell the VMM to quit; the supervisor records ``suspended`` (see runtime.supervisor)."""
    ws.run.update(suspending=tag)
    try:
        qmp.quit_vmm(vm_dir)
    except BaseException:
        ws.run.update(suspending=None)  # a later end of this VMM is no suspension
        raise
    deadline = time.monotonic() + SUSPEND_WAIT
    while time.monotonic() < deadline:
        state = reconcile(ws)
        if not state.live:
            return state
        time.sleep(POLL)
    raise VMError(
        f"workspace {ws.name!r} did not stop within {SUSPEND_WAIT:g}s after its snapshot",
        hint=f"snapshot {tag} is complete: `microagent kill {ws.name}` then "
        f"`microagent start {ws.name} --from {tag}`",
    )


def suspend(settings: Settings, ws: Workspace) -> SnapshotReport:
    """Snapshot ``suspended`` and stop: ``start`` resumes the workspace where it was."""
    return create(settings, ws, SUSPEND_TAG, stop=True)


# -- list / remove ------------------------------------------------------------------------------


def listing(ws: Workspace) -> list[dict[str, Any]]:
    return list(snapshot.listing(ws.root))


def remove(ws: Workspace, tag: str) -> bool:
    snapshot.check_tag(tag)
    with _exclusive(ws, "remove a snapshot"):
        removed = snapshot.remove(ws.root, tag)
    if removed:
        ws.run.event("snapshot-removed", f"snapshot {tag} removed", tag=tag)
    return removed


# -- restore (start) ----------------------------------------------------------------------------


def restore_tag(ws: Workspace, state: State, from_tag: str | None) -> str | None:
    """The snapshot a start restores: ``from_tag``, or the suspend snapshot of a suspended
    workspace (None when it was removed: the start boots cold, event ``cold``)."""
    if from_tag is not None:
        return snapshot.check_tag(from_tag)
    if state is not State.SUSPENDED:
        return None
    tag = ws.run.runtime().get("suspendedTag") or SUSPEND_TAG
    if snapshot.snapshot_path(ws.root, str(tag)).exists():
        return str(tag)
    ws.run.event("cold", f"snapshot {tag} is gone: the suspended workspace boots afresh")
    return None


def check_restorable(ws: Workspace, tag: str) -> Manifest:
    """The snapshot's manifest once every file matches its digest (IntegrityError else);
    event ``verified``: which files were hashed, which were unchanged since verified."""
    manifest = snapshot.read_manifest(ws.root, tag)
    began = time.monotonic()
    trusted = snapshot.verify(ws.root, manifest)
    hashed = [f.file for f in (manifest.state, *manifest.disks) if f.file not in trusted]
    seconds = round(time.monotonic() - began, 3)
    ws.run.event(
        "verified",
        f"snapshot {tag}: {len(hashed)} file(s) hashed, {len(trusted)} unchanged since "
        f"verified, in {seconds}s",
        tag=tag,
        hashed=hashed,
        unchanged=list(trusted),
        seconds=seconds,
    )
    return manifest


def apply(settings: Settings, ws: Workspace, manifest: Manifest, config: BootConfig) -> Path:
    """Check the snapshot against the VM ``config`` boots now, put its disks back; the
    VM state file for the supervisor (resolved: a later snapshot of the tag cannot swap it)."""
    backend = backend_of(settings)
    now_identity = make_identity(
        backend.vmm_version(),
        list(backend.command(config)),
        config.kernel,
        config.initrd,
        ws.record().rootfs_key,
        book=kit_book(settings),
    )
    snapshot.check_identity(manifest, now_identity)
    folder = snapshot.snapshot_path(ws.root, manifest.tag).resolve()
    targets = {name: path for path, name in _written_disks(ws)}
    missing = [d.disk for d in manifest.disks if d.disk not in targets]
    if missing:
        raise NotFoundError(
            f"snapshot {manifest.tag!r} has disks this workspace lacks: {', '.join(missing)}"
        )
    for saved in manifest.disks:
        target = targets[saved.disk]
        tmp = target.with_name(f".{target.name}.restore")
        copy_disk(folder / saved.file, tmp)
        tmp.replace(target)
    ws.run.update(stateDiskDirty=None)  # the disks are the snapshot's now, clean as it was
    ws.run.event("restore", f"restoring snapshot {manifest.tag}", tag=manifest.tag)
    return folder / manifest.state.file


def link_files(source: Path, target: Path, manifest: Manifest) -> None:
    """The snapshot files of folder ``source`` in folder ``target``: hard links (published
    snapshot files are never written), whose stamps move along (runtime.stamps, rule 3: the
    link changes a file's ctime, nothing else); reflink/sparse copies where the two folders
    are on different filesystems (hashed at their restore)."""
    books = (stamps.Book.of_folder(source), stamps.Book.of_folder(target))
    for saved in (manifest.state, *manifest.disks):
        try:
            stamps.link(source / saved.file, target / saved.file, books)
        except OSError:
            snapshot.copy_disk(source / saved.file, target / saved.file)


# -- fork ---------------------------------------------------------------------------------------


def fork(ws: Workspace, tag: str, spaces: Workspaces, new_name: str) -> Workspace:
    """A new workspace ``new_name`` made from snapshot ``tag`` of ``ws``: its own copy of the
    record and of every disk the snapshot saved (reflink/sparse copies: the VM writes them),
    and the snapshot itself, whose published files are never written, as hard links (copies
    across filesystems; their digest stamps move along, so the fork's first start does not
    hash them again), as a ``suspended`` workspace that ``start`` resumes. It runs beside the
    original with its own VM directory, network namespace and NAT; published host ports are
    not copied (they are the original's). The memory image holds the original's environment,
    as the copied record does: the fork's link to it stays in the new workspace's folder."""
    with _exclusive(ws, "fork"):  # no snapshot of ``tag`` replaces it while it is copied
        return _fork(ws, tag, spaces, new_name)


def _fork(ws: Workspace, tag: str, spaces: Workspaces, new_name: str) -> Workspace:
    manifest = check_restorable(ws, tag)
    record = dataclasses.replace(ws.record(), name=new_name, published=(), created_at=now())
    tmp = spaces.reserve(new_name)
    try:
        new = Workspace(tmp)
        source = snapshot.snapshot_path(ws.root, tag).resolve()
        copy = snapshot.begin(tmp, tag)
        link_files(source, copy, manifest)  # published files are never written: shared
        snapshot.publish(tmp, tag, copy, manifest)
        (tmp / "disks").mkdir(exist_ok=True)
        for saved in manifest.disks:
            target = new.state_disk if saved.disk == "state" else new.disk_copy(saved.disk)
            copy_disk(source / saved.file, target)
        write_json_atomic(new.record_path, record.to_json(), mode=0o600)
        detail = f"forked from workspace {ws.name} snapshot {tag}"
        new.run.set_state(State.SUSPENDED, detail, suspendedTag=tag)
        made = spaces.install(new_name, tmp)
    except BaseException:
        remove_any(tmp)
        spaces.release(tmp)
        raise
    ws.run.event("fork", f"workspace {new_name} forked from snapshot {tag}", tag=tag)
    return made


# -- warm start: what a resumed template still needs (see workspace.templates) ----------------


def template_entry(key: str) -> str:
    """The store entry of template ``key`` (``templates/<hex>``)."""
    return f"{TEMPLATES_KIND}/{key.removeprefix('sha256:')}"


def forget_corrupt(store: Store, key: str) -> None:
    """After the workspace's copy of template ``key`` was refused as corrupt: the store's
    template goes too when it is the same files (hard links) or itself fails its digests."""
    name = template_entry(key)
    folder = store.entry_path(name)
    try:
        manifest = snapshot.read_manifest(folder, TEMPLATE_TAG)
        snapshot.verify(folder, manifest, trust_stamps=False)
    except MicroagentError:
        store.remove(name)
