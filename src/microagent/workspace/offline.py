"""What touching a stopped workspace's disks needs (``cp``, and ``start`` before it boots):
no VM of it runs, and a state disk a killed VMM may have left mid-write is repaired first.

Kept apart from :mod:`.lifecycle` so that ``cp`` loads the workspace records and the e2fsck
runner, not what booting loads (networking, the broker, snapshots, the boot disks).
"""

from __future__ import annotations

from pathlib import Path

from microagent import runner
from microagent.errors import ConflictError, IntegrityError, MicroagentError
from microagent.ext4.debugfs import repair_image
from microagent.fsutil import flocked
from microagent.runtime.rundir import State
from microagent.workspace.liveness import reconcile
from microagent.workspace.records import Record, Workspace


def refuse_running_vmm(ws: Workspace, verb: str) -> None:
    """Refuse ``verb`` while the VMM the supervisor recorded still runs (its supervisor gone)."""
    vmm = ws.run.vmm()
    if vmm is not None and runner.is_running(vmm):
        raise ConflictError(
            f"cannot {verb}: a VM of workspace {ws.name!r} is still running (pid {vmm.pid}) "
            "although its supervisor is gone",
            hint=f"`microagent halt {ws.name}` stops it",
        )


def ensure_offline(ws: Workspace, verb: str, *, writing: bool = False) -> Record:
    """The record of a workspace no VM runs; ``writing``: its disk is about to change, which
    a suspended workspace cannot take (it resumes with the disk its snapshot saved)."""
    state = reconcile(ws)
    if writing and state is State.SUSPENDED:
        raise ConflictError(
            f"cannot {verb} into workspace {ws.name!r}: it is suspended, and resumes with the "
            "disk its snapshot saved",
            hint=f"`microagent start {ws.name}` resumes it first (then halt it and copy), "
            f"or `microagent snapshot rm {ws.name} suspended` discards the saved memory",
        )
    if state.live:
        raise ConflictError(
            f"cannot {verb} while workspace {ws.name!r} is {state.value}",
            hint=f"`microagent halt {ws.name}` first",
        )
    refuse_running_vmm(ws, verb)
    repair_state_disk(ws, f"{verb} of workspace {ws.name!r}")
    return ws.record()


def repair_state_disk(ws: Workspace, purpose: str = "") -> int | None:
    """Run a repairing ``e2fsck -fy`` on the disks a VM writes (the state disk, the
    workspace's own rw disk copies) once marked as possibly dirty (a killed VMM), then clear
    the mark; the highest e2fsck exit code (0 clean, 1-2 repaired), None when not marked.
    IntegrityError (the mark kept, the disk as it is) when one cannot be repaired: it says
    what cannot be done, ``purpose`` (e.g. "start workspace 'ws'")."""
    why = ws.run.runtime().get("stateDiskDirty")
    if not why or not ws.state_disk.is_file():
        return None
    purpose = purpose or f"use workspace {ws.name!r}"
    codes = [_repair(ws, disk, what, str(why), purpose) for disk, what in _written_disks(ws)]
    ws.run.update(stateDiskDirty=None)
    return max(codes)


def _written_disks(ws: Workspace) -> list[tuple[Path, str]]:
    """The disk images a boot of ``ws`` writes, each with what the fsck event calls it."""
    disks = [(ws.state_disk, "state disk")]
    try:
        record = ws.record()
    except MicroagentError:
        return disks  # the start fails on the record anyway
    for disk in record.disks:
        copy = ws.disk_copy(disk.name)
        if not disk.readonly and not disk.entry and copy.is_file():
            disks.append((copy, f"disk {disk.name}"))
    return disks


def _repair(ws: Workspace, disk: Path, what: str, why: str, purpose: str) -> int:
    with flocked(disk):  # the lock `cp` holds on the image
        try:
            code = repair_image(disk, f"workspace {what}")
        except IntegrityError as exc:
            ws.run.event("fsck", f"{what} checked after {why}: not repairable")
            raise _unrepairable(ws, disk, exc, purpose) from exc
    outcome = "clean" if code == 0 else "repaired"
    ws.run.event("fsck", f"{what} checked after {why}: {outcome}", exitCode=code)
    return code


def _unrepairable(ws: Workspace, disk: Path, exc: IntegrityError, purpose: str) -> IntegrityError:
    """The check found what it cannot fix: nothing boots on the disk, and it stays as it is
    (still marked, so every start checks it again) until the user repairs or recreates it."""
    return IntegrityError(
        f"cannot {purpose}: {exc.message}",
        hint=f"the disk is kept as it is: repair it by hand (`e2fsck -f {disk}`) and start "
        f"again, or save what is readable (`debugfs -R 'rdump / DIR' {disk}`) and recreate "
        f"the workspace (`microagent delete {ws.name}`, then `microagent create`)",
    )
