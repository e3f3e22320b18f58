"""The library: every operation the CLI offers, as typed calls.

``Microagent(settings)`` is the entry point; the CLI is flag parsing over it. Collaborators are
resolved from the settings unless given: the registry client (mirrors, credentials), the
backend (``qemu``, ``fake`` ...) and the guest kit. Progress lines go to ``say``; a setup
step's or a one-shot run's live output to ``output``; a notice of trouble being ridden out (a
registry request retried) to ``notice``, which the CLI shows even with ``--json``.

Imports are deferred by operation: ``validate``, ``plan`` and ``lock`` load only the compiler,
the store and the registry client (they are what a CLI start-up waits for); building, booting,
workspaces, the store and the guest kit load their packages on first use (``cp`` loads the
workspace records and the disk tools, not the store or the compiler). The operations' reports
live beside what they report (:mod:`microagent.compiler.reports`,
:mod:`microagent.workspace.reports`, :mod:`microagent.workspace.copying`), so a command
builds only the report types it returns.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microagent.errors import InvalidInputError, NotFoundError

if TYPE_CHECKING:
    from microagent.build.base import BaseImage
    from microagent.build.pipeline import Pipeline
    from microagent.compiler.cachecontrol import CacheControl
    from microagent.compiler.credentials import Credential
    from microagent.compiler.overrides import Overrides, RuntimeEnv
    from microagent.compiler.plan import StepCache
    from microagent.compiler.reports import LockReport, PlanReport
    from microagent.compiler.spec import Spec
    from microagent.kit.guestkit import GuestKit
    from microagent.oci.registry import RegistryClient
    from microagent.oci.transport import Repository
    from microagent.remotecache.exchange import ImportReport
    from microagent.remotecache.publish import PublishReport
    from microagent.runtime.backend import Backend, GuestResult, OutputSink
    from microagent.runtime.boot import RunRequest
    from microagent.runtime.execclient import ExecIO, ExecResult
    from microagent.runtime.rundir import State
    from microagent.settings import Settings
    from microagent.store.content import Entry, PruneReport, Store
    from microagent.store.verify import VerifyReport
    from microagent.workspace.copying import CopyReport
    from microagent.workspace.create import CreateReport
    from microagent.workspace.doctor import Report
    from microagent.workspace.lifecycle import Runtime
    from microagent.workspace.records import Workspace, Workspaces
    from microagent.workspace.reports import BuildReport, KillReport, StartReport, WaitReport
    from microagent.workspace.run import OneShot
    from microagent.workspace.snapshots import SnapshotReport

Say = Callable[[str], None]
MAX_EXEC_TIMEOUT = 30 * 86400  # seconds: exec --timeout (the guest counts milliseconds)


def _quiet(_message: str) -> None:
    return None


def load(path: Path | str, overrides: Overrides | None = None) -> Spec:
    """Load a spec and apply command-line overrides."""
    # deferred: the spec loader (YAML, the schema) is not on the workspace verbs' path
    from microagent.compiler.loader import load_spec
    from microagent.compiler.overrides import apply_overrides

    spec = load_spec(path)
    return apply_overrides(spec, overrides) if overrides else spec


def parse_remote_path(text: str) -> tuple[str, str] | None:
    """``NAME:/absolute/path`` -> (NAME, path); None for a host path."""
    name, sep, path = text.partition(":")
    if sep and path.startswith("/") and name and "/" not in name:
        return name, path
    return None


def check_host_target(text: str) -> None:
    """Refuse a host destination of ``cp`` that cannot be what the user meant, before any
    workspace is touched: ``DIR/`` (a directory) that does not exist, or a parent that does
    not exist (``Path`` would drop the slash and write a file named ``DIR``)."""
    path = Path(text)
    if text.endswith(("/", os.sep)) and not path.is_dir():
        raise NotFoundError(
            f"host directory {text} does not exist",
            hint=f"create it first (`mkdir -p {text}`), or name a file without the trailing /",
        )
    if not path.is_dir() and not path.parent.is_dir():
        raise NotFoundError(
            f"cannot copy to {text}: host directory {path.parent} does not exist",
            hint=f"create it first (`mkdir -p {path.parent}`) or copy into a directory that exists",
        )


def output_tail(payload: Mapping[str, Any], serial_log: Path, lines: int = 10) -> tuple[str, ...]:
    """The last ``lines`` lines of what a run printed: its stderr, else its stdout, else the
    serial console (a boot that failed before the entrypoint)."""
    # deferred: the runtime package is loaded by the commands that boot
    from microagent.runtime.control import tail_text

    for key in ("stderr", "stdout"):
        text = payload.get(key)
        if isinstance(text, str) and text.strip():
            return tuple(text.replace("\r", "").strip().splitlines()[-lines:])
    return tuple(tail_text(serial_log, lines).splitlines())


@dataclass
class Microagent:
    """Every operation of the CLI over one store, registry client, backend and guest kit."""

    settings: Settings
    say: Say = _quiet
    output: OutputSink | None = None
    injected_backend: Backend | None = field(default=None, repr=False)
    notice: Say = _quiet

    # -- collaborators ----------------------------------------------------------------------

    @cached_property
    def store(self) -> Store:
        from microagent.store.content import Store  # deferred: see the module docstring

        return Store(self.settings.store_dir)

    @cached_property
    def workspaces(self) -> Workspaces:
        # deferred: see the module docstring
        from microagent.workspace.records import Workspaces

        return Workspaces(self.settings.workspaces_dir)

    @cached_property
    def client(self) -> RegistryClient:
        # deferred: see the module docstring
        from microagent.oci.registry import RegistryClient

        return RegistryClient.from_settings(self.settings, notify=self.notice)

    def backend(self) -> Backend:
        # deferred: see the module docstring
        from microagent.runtime.backends import get_backend

        if self.injected_backend is not None:
            return self.injected_backend
        settings = self.settings
        return get_backend(
            settings.backend, probes_dir=settings.probes_dir, fake_outcome=settings.fake_outcome
        )

    def kit(self) -> GuestKit:
        return self._kit(self.settings)

    def _kit(self, settings: Settings) -> GuestKit:
        """The guest kit to boot; for the fake backend, which boots nothing, the user's files
        or placeholders (never a download)."""
        # deferred: see the module docstring
        from microagent.kit.guestkit import GuestKit, kit_for
        from microagent.runtime.fake import placeholder_boot_files

        backend = self.injected_backend.name if self.injected_backend else settings.backend
        if backend != "fake":
            return kit_for(settings, self.store, self.say)
        kernel, initrd = placeholder_boot_files(settings.home / "fake-kit")
        return GuestKit(
            settings.kernel or kernel,
            settings.initrd or initrd,
            kernel_version="fake",
            source="placeholder",
        )

    def pipeline(
        self,
        *,
        timeout: float | None = None,
        cache_from: Sequence[str] = (),
        cache_to: str | None = None,
        platform: str | None = None,
        control: CacheControl | None = None,
    ) -> Pipeline:
        # deferred: see the module docstring
        from microagent.build.pipeline import Pipeline
        from microagent.compiler.cachecontrol import CacheControl

        return Pipeline(
            self.settings,
            lambda: self.client,
            self.backend,
            self.kit,
            self.say,
            self.output,
            timeout,
            tuple(cache_from),
            cache_to,
            platform,
            control or CacheControl(),
        )

    # -- specs ------------------------------------------------------------------------------

    def validate(self, path: Path, overrides: Overrides | None = None) -> Spec:
        return load(path, overrides)

    def plan(
        self,
        path: Path,
        overrides: Overrides | None = None,
        env: RuntimeEnv | None = None,
        *,
        offline: bool = False,
        cache_from: Sequence[str] = (),
        control: CacheControl | None = None,
    ) -> PlanReport:
        """Load, resolve and plan a spec, and look every step up (locally, then remotely);
        ``control`` (--no-cache, --no-cache-from N, --refresh) as a build would use it."""
        # deferred: see the module docstring
        from microagent.compiler.plan import compile_plan, plan_status
        from microagent.compiler.reports import PlanReport
        from microagent.oci.resolve import Resolutions, resolve_image
        from microagent.store.stepcache import StoreStepCache

        spec = load(path, overrides)
        recent = Resolutions.of(self.settings, refresh=bool(control and control.refresh))
        image = resolve_image(spec, lambda: self.client, offline=offline, recent=recent)
        built = compile_plan(spec, image, runtime_env_keys=env.names if env else ())
        cache: StepCache = StoreStepCache(self.store)
        sources = [] if offline else self._remote_sources(cache_from)
        if not sources:
            return PlanReport(spec, built, plan_status(built, cache, control))
        from microagent.remotecache.restore import (  # deferred: see the module docstring
            RemoteStepCache,
            Restorer,
        )

        restorer = Restorer(self.store, sources, self.say)
        status = plan_status(built, RemoteStepCache(cache, restorer), control)
        asked = tuple(source.where for source in sources)
        return PlanReport(spec, built, status, asked, tuple(restorer.warnings))

    def _remote_sources(self, cache_from: Sequence[str]) -> list[Repository]:
        # deferred: see the module docstring
        from microagent.remotecache.refs import remote_sources

        return remote_sources(cache_from, self.settings, lambda: self.client)

    def lock(self, path: Path, *, update: bool = False) -> LockReport:
        """Write (or refresh) ``microagent.lock`` beside the spec."""
        # deferred: see the module docstring
        from microagent.compiler.lock import (
            LockEntry,
            LockFile,
            lock_key,
            lock_path_for,
            read_lock,
            write_lock,
        )
        from microagent.compiler.refs import parse_any_ref  # deferred: as above
        from microagent.compiler.reports import LockReport  # deferred: as above

        spec = load(path)
        key = lock_key(spec.image)  # a layout as written, normalised: the lock is for git
        lock_file = read_lock(lock_path_for(spec.source)) or LockFile(lock_path_for(spec.source))
        if key in lock_file.images and not update and not lock_file.outdated:
            return LockReport(lock_file, key, False)
        ref = parse_any_ref(spec.image, spec.base_dir)
        if ref.digest:
            entry = LockEntry(key if key.startswith("oci:") else str(ref), ref.digest, {})
        elif key in lock_file.images and not update:  # an old lock: rewritten, not resolved
            entry = lock_file.images[key]
        else:
            # deferred: see the module docstring
            from microagent.oci.transport import lock_entry, open_repository

            entry = lock_entry(open_repository(ref, self.client), ref)
            if key.startswith("oci:"):
                entry = LockEntry(key, entry.digest, entry.platforms)
        changed = lock_file.outdated or lock_file.images.get(key) != entry
        updated = lock_file.with_entry(key, entry)
        if changed:
            write_lock(updated)
        return LockReport(updated, key, changed)

    # -- building ---------------------------------------------------------------------------

    def build(
        self,
        path: Path,
        overrides: Overrides | None = None,
        env: RuntimeEnv | None = None,
        *,
        push: str | None = None,
        cache_from: Sequence[str] = (),
        cache_to: str | None = None,
        platform: str | None = None,
        timeout: float | None = None,
        control: CacheControl | None = None,
    ) -> BuildReport:
        """Build every step of a spec (no workspace); with ``push`` publish it."""
        # deferred: see the module docstring
        from microagent.remotecache.publish import record_files_and_config
        from microagent.workspace.reports import BuildReport

        began = time.monotonic()
        pipeline = self.pipeline(
            timeout=timeout,
            cache_from=cache_from,
            cache_to=cache_to,
            platform=platform,
            control=control,
        )
        # deferred: see the module docstring
        from microagent.compiler.overrides import RuntimeEnv
        from microagent.store.retention import builds_in_flight

        spec = load(path, overrides)
        with builds_in_flight(self.store):  # a concurrent prune waits for it
            outcome = pipeline.build(spec, env or RuntimeEnv())
            record_files_and_config(self.store, outcome.plan)
            published = pipeline.publish(outcome.plan, push=push)
        return BuildReport(outcome, published, time.monotonic() - began, spec.image)

    def create(
        self,
        path: Path,
        overrides: Overrides | None = None,
        env: RuntimeEnv | None = None,
        *,
        forwards: Sequence[str] = (),
        timeout: float | None = None,
        cache_from: Sequence[str] = (),
        cache_to: str | None = None,
        control: CacheControl | None = None,
        warm: bool = False,
    ) -> CreateReport:
        """Build (or reuse) the spec's steps and make a persistent workspace; ``warm`` (or
        the spec's ``warm``): a fork of the spec's warm template, made first if there is none
        (see :mod:`microagent.workspace.templates`), left ``suspended`` for ``start``."""
        # deferred: see the module docstring
        from microagent.compiler.loader import load_spec
        from microagent.compiler.overrides import RuntimeEnv, apply_overrides, confirm_credentials
        from microagent.workspace.create import create, port_forwards

        parsed: tuple[tuple[int, int], ...] = ()
        if forwards:  # the backend's types only for --host-forward (see the module docstring)
            from microagent.runtime.backend import Forward  # deferred: as above

            parsed = port_forwards(tuple(Forward.parse(item) for item in forwards))
        pipeline = self.pipeline(
            timeout=timeout, cache_from=cache_from, cache_to=cache_to, control=control
        )
        declared = load_spec(path)
        confirm_credentials(declared, overrides)  # what the spec asks for, before the flags
        spec = apply_overrides(declared, overrides) if overrides else declared
        self._say_where(spec.credentials)
        env = env or RuntimeEnv()
        warm = warm or spec.warm
        if not warm:
            return create(pipeline, self.workspaces, spec, env, parsed)
        # deferred: warm templates boot and snapshot (the lifecycle, the broker, snapshots)
        from microagent.workspace import templates

        templates.refuse_runtime_env(env)  # before anything is built
        report = create(pipeline, self.workspaces, spec, env, parsed)
        made = templates.warm(self._runtime(), report.workspace, say=self.notice)
        seconds = report.seconds + made.seconds
        return replace(report, warm=made, seconds=seconds)

    def _say_where(self, credentials: Sequence[Credential]) -> None:
        """Say where each key goes that is not a stock preset's."""
        for cred in credentials:
            if cred.needs_confirmation:
                self.say(f"credential {cred.name}: {cred.source} -> {cred.upstream}")

    # -- workspaces -------------------------------------------------------------------------

    def workspace(self, name: str) -> Workspace:
        return self.workspaces.get(name)

    def _runtime(self) -> Runtime:
        # deferred: see the module docstring
        from microagent.workspace.lifecycle import Runtime

        return Runtime(self.settings, self.kit, self.notice)

    def start(
        self,
        name: str,
        *,
        wait: bool = False,
        timeout: float | None = None,
        from_tag: str | None = None,
    ) -> StartReport:
        """Boot a workspace; with ``wait`` block until its entrypoint exits. A suspended
        workspace resumes where it was; ``from_tag`` restores that snapshot (memory and
        disks) instead of booting."""
        # deferred: see the module docstring
        from microagent.workspace import lifecycle
        from microagent.workspace.reports import StartReport

        ws = self.workspace(name)
        runtime = lifecycle.start(self._runtime(), ws, from_tag=from_tag)
        if not wait:
            return StartReport(name, str(runtime.get("state")))
        state, done = lifecycle.wait_until(ws, timeout)
        if not done:
            return StartReport(name, state.value, timed_out=True)
        payload = lifecycle.result_payload(ws) or {}
        code = int(payload.get("exitCode", 1 if state.value == "failed" else 0))
        report = StartReport(name, state.value, code)
        if not report.failed:
            return report
        detail = str(ws.run.runtime().get("detail") or "")
        tail = output_tail(payload, ws.run.serial_log)
        return StartReport(name, state.value, code, detail=detail, output_tail=tail)

    def pause(self, name: str) -> State:
        """Freeze a running workspace's vCPUs (state ``paused``)."""
        # deferred: see the module docstring
        from microagent.workspace import snapshots

        return snapshots.pause(self.workspace(name))

    def resume(self, name: str) -> tuple[State, str]:
        """Thaw a paused workspace and set its guest clock; the state and the clock's fate."""
        # deferred: see the module docstring
        from microagent.workspace import snapshots

        return snapshots.resume(self.workspace(name))

    def snapshot_create(
        self, name: str, tag: str | None = None, *, stop: bool = False
    ) -> SnapshotReport:
        """Save a running or paused workspace's memory and disks as snapshot ``tag``
        (default ``snap-YYYYMMDD-HHMMSS``); with ``stop`` it is suspended afterwards."""
        # deferred: see the module docstring
        from microagent.runtime.snapshot import default_tag
        from microagent.workspace import snapshots

        ws = self.workspace(name)
        return snapshots.create(self.settings, ws, tag or default_tag(), stop=stop)

    def snapshot_list(self, name: str) -> list[dict[str, Any]]:
        # deferred: see the module docstring
        from microagent.workspace import snapshots

        return snapshots.listing(self.workspace(name))

    def snapshot_remove(self, name: str, tag: str) -> bool:
        # deferred: see the module docstring
        from microagent.workspace import snapshots

        return snapshots.remove(self.workspace(name), tag)

    def suspend(self, name: str) -> SnapshotReport:
        """Snapshot a running workspace and stop it; ``start`` resumes it where it was."""
        # deferred: see the module docstring
        from microagent.workspace import snapshots

        return snapshots.suspend(self.settings, self.workspace(name))

    def fork(self, name: str, tag: str, new_name: str, *, start: bool = True) -> StartReport:
        """A new workspace from snapshot ``tag`` of ``name``, with its own disks; with
        ``start`` it resumes at once (else it waits ``suspended``)."""
        # deferred: see the module docstring
        from microagent.workspace import snapshots
        from microagent.workspace.reports import StartReport

        snapshots.fork(self.workspace(name), tag, self.workspaces, new_name)
        if not start:
            return StartReport(new_name, "suspended")
        return self.start(new_name)

    def status(self, name: str) -> dict[str, Any]:
        # deferred: see the module docstring
        from microagent.workspace import lifecycle

        return lifecycle.status(self.workspace(name), self.settings.backend)

    def result(self, name: str) -> dict[str, Any]:
        # deferred: see the module docstring
        from microagent.workspace import lifecycle

        return lifecycle.result(self.workspace(name))

    def halt(self, name: str, *, timeout: float = 30.0) -> State:
        # deferred: see the module docstring
        from microagent.workspace import lifecycle

        return lifecycle.halt(self.workspace(name), timeout=timeout)

    def kill(self, name: str) -> KillReport:
        """Stop a workspace now (SIGKILL, no guest shutdown); its disk is checked next start."""
        # deferred: see the module docstring
        from microagent.workspace import lifecycle, liveness
        from microagent.workspace.reports import KillReport

        ws = self.workspace(name)
        killed = lifecycle.kill(ws)
        return KillReport(name, liveness.reconcile(ws).value, killed)

    def wait(self, name: str, *, timeout: float | None = None) -> WaitReport:
        """Block until a workspace is stopped, halted or failed (or ``timeout`` passes)."""
        # deferred: see the module docstring
        from microagent.workspace import lifecycle
        from microagent.workspace.reports import WaitReport

        state, done = lifecycle.wait_until(self.workspace(name), timeout)
        return WaitReport(name, state.value, timed_out=not done)

    def ps(self) -> list[dict[str, Any]]:
        """The live workspaces (starting, running, stopping), dead supervisors reconciled."""
        # deferred: see the module docstring
        from microagent.workspace import lifecycle

        rows = (lifecycle.live_row(ws) for ws in self.workspaces)
        return [row for row in rows if row is not None]

    def delete(self, names: Sequence[str], *, force: bool = False) -> list[dict[str, Any]]:
        """Remove workspaces (idempotent): one ``{workspace, deleted}`` per name."""
        # deferred: see the module docstring
        from microagent.workspace import lifecycle

        return [
            {"workspace": n, "deleted": lifecycle.delete(self.workspaces.path(n), force=force)}
            for n in names
        ]

    def list_workspaces(self) -> list[dict[str, Any]]:
        # deferred: see the module docstring
        from microagent.workspace import liveness

        rows = []
        for ws in self.workspaces:
            state = liveness.reconcile(ws)
            observed = ws.run.runtime().get("observedAt")
            rows.append({"name": ws.name, "state": state.value, "observedAt": observed})
        return rows

    def events(self, name: str) -> list[dict[str, Any]]:
        return self.workspace(name).run.events()

    def logs(self, name: str, *, follow: bool = False, poll: float = 0.3) -> Iterator[bytes]:
        """The serial console, in chunks; with ``follow`` until the workspace stops."""
        # deferred: see the module docstring
        from microagent.workspace import liveness

        ws = self.workspace(name)
        offset = 0
        while True:
            try:
                with ws.run.serial_log.open("rb") as fh:
                    if fh.seek(0, 2) < offset:  # rotated (see runtime.control.rotate_log)
                        offset = 0
                    fh.seek(offset)
                    chunk = fh.read()
            except FileNotFoundError:
                chunk = b""
            offset += len(chunk)
            if chunk:
                yield chunk
            if not follow or liveness.reconcile(ws).terminal:
                return
            time.sleep(poll)

    def audit(
        self, name: str, *, follow: bool = False, poll: float = 0.3
    ) -> Iterator[dict[str, Any]]:
        """The workspace's audit log, oldest entry first (its rotated predecessor included);
        with ``follow``, new entries as they are written until the workspace stops."""
        # deferred: see the module docstring
        from microagent.workspace import audit, liveness

        ws = self.workspace(name)
        path = audit.audit_path(ws.run)
        if not follow:
            return audit.entries(path)
        return audit.follow(path, stop=lambda: liveness.reconcile(ws).terminal, poll=poll)

    def cp(self, source: str, target: str) -> CopyReport:
        """Copy a file between the host and a stopped workspace (``NAME:/path`` on one side)."""
        # deferred: see the module docstring
        from microagent.ext4 import overlay
        from microagent.workspace import offline
        from microagent.workspace.copying import CopyReport

        src, dst = parse_remote_path(source), parse_remote_path(target)
        if (src is None) == (dst is None):
            raise InvalidInputError("exactly one of SOURCE and TARGET must be NAME:/absolute/path")
        name = (src or dst)[0]  # type: ignore[index]
        if src is not None:
            check_host_target(target)
        ws = self.workspace(name)
        record = offline.ensure_offline(ws, "copy files", writing=dst is not None)
        root = record.root_images
        if dst is not None:
            size = overlay.copy_in(ws.state_disk, root, Path(source), dst[1])
            return CopyReport(name, "to-workspace", source, target, dst[1], size)
        assert src is not None
        size = overlay.copy_out(ws.state_disk, root, src[1], Path(target))
        return CopyReport(name, "from-workspace", source, target, src[1], size)

    def exec(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        tty: bool = False,
        stdin: int | bytes | None = None,
        timeout: float | None = None,
        io: ExecIO | None = None,
        size: tuple[int, int] = (24, 80),
    ) -> ExecResult:
        """Run a command in a running workspace through its guest agent.

        It gets the workspace's runtime environment plus ``env``; ``stdin`` is a file
        descriptor read until end of file, or bytes (None: /dev/null); ``tty`` gives it a
        terminal of ``size`` (rows, cols). With ``io`` its output streams there, else it is
        collected (the first 16 MiB of each stream). ``timeout`` seconds end it (exit code
        124). A workspace still starting is waited for (30 s); one that is not running is a
        ConflictError.
        """
        # deferred: see the module docstring
        from microagent.runtime.agentproto import ExecRequest
        from microagent.workspace.execs import run_exec

        if not argv:
            raise InvalidInputError("exec: give the command to run")
        if timeout is not None and not 0 < timeout <= MAX_EXEC_TIMEOUT:
            raise InvalidInputError(f"exec: the timeout must be in (0, {MAX_EXEC_TIMEOUT}] s")
        request = ExecRequest(
            tuple(argv),
            env=dict(env or {}),
            cwd=cwd,
            user=user,
            tty=tty,
            rows=size[0],
            cols=size[1],
            timeout_ms=None if timeout is None else max(1, round(timeout * 1000)),
        )
        return run_exec(self.workspace(name), request, io=io, stdin=stdin, timeout=timeout)

    # -- one-shot runs ----------------------------------------------------------------------

    def _one_shot(self, job: OneShot) -> RunRequest:
        # deferred: see the module docstring
        from microagent.workspace.run import one_shot_request

        rootfs = job.rootfs
        if rootfs is None:
            assert job.image is not None
            rootfs = self.image_pull(job.image).rootfs
        return one_shot_request(job, rootfs, self.settings)

    def run(self, job: OneShot) -> GuestResult:
        """Run a command in a fresh microVM (an image's rootfs, or an ext4 file); the job's
        credentials are brokered by a gateway on the host for the run's length."""
        # deferred: see the module docstring
        from microagent.workspace.run import open_audit_log, read_secrets, run_brokered

        kit = self.one_shot_kit(job)
        self._say_where(job.credentials)
        secrets = read_secrets(job)  # a missing value fails before the pull
        audit_fd = open_audit_log(job.audit_log)  # so does a log that cannot be written
        try:
            request = self._one_shot(job)
            return run_brokered(
                request,
                job,
                secrets,
                settings=self.settings,
                backend=self.backend(),
                kit=kit,
                on_output=self.output,
                audit_fd=audit_fd,
                notice=self.notice,  # a warning: shown even with --json
            )
        finally:
            if audit_fd is not None:
                os.close(audit_fd)

    def run_command(self, job: OneShot) -> list[str]:
        """The VMM argv ``run`` would use (``--print-command``)."""
        # deferred: see the module docstring
        from microagent.runtime.boot import print_command

        kit = self.one_shot_kit(job)
        return print_command(self._one_shot(job), backend=self.backend(), kit=kit)

    def one_shot_kit(self, job: OneShot) -> GuestKit:
        settings = self.settings.with_changes(
            kernel=job.kernel or self.settings.kernel, initrd=job.initrd or self.settings.initrd
        )
        return self._kit(settings)

    # -- images, cache, kernels -------------------------------------------------------------

    def image_pull(self, ref: str, *, platform: str | None = None) -> BaseImage:
        # deferred: see the module docstring
        from microagent.build.base import pull_base

        return pull_base(
            self.store,
            ref,
            client=self.client,
            base_dir=Path.cwd(),
            platform=platform,
            progress=self.say,
            ram=self.settings.ram_stage,
        )

    def image_list(self) -> list[dict[str, Any]]:
        # deferred: see the module docstring
        from microagent.build.base import list_bases

        rows = []
        for record in list_bases(self.store):
            assert record.origin is not None and record.rootfs is not None
            rootfs = self.store.entry_path(record.rootfs)
            st = rootfs.stat()
            rows.append(
                {
                    "key": record.key,
                    "reference": record.origin.reference,
                    "digest": record.inputs["digest"],
                    "platform": record.inputs["platform"],
                    "rootfs": str(rootfs),
                    "size": st.st_blocks * 512,
                    "lastUsed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)),
                }
            )
        return rows

    def image_remove(self, what: str, *, dry_run: bool = False) -> list[str]:
        """Forget the pulled images matching ``what``; with ``dry_run`` only say which."""
        # deferred: see the module docstring
        from microagent.build.base import remove_base

        return remove_base(self.store, what, dry_run=dry_run, in_use=self.cache_in_use())

    def cache_entries(self) -> list[Entry]:
        return self.store.entries()

    def cache_prune(
        self,
        max_bytes: int | None = None,
        *,
        everything: bool = False,
        older_than: float | None = None,
        kits: bool = False,
        dry_run: bool = False,
    ) -> PruneReport:
        """Least recently used first; never what a workspace still boots from.

        ``older_than`` (seconds) protects every entry used more recently; alone it removes
        every older one. Guest kits (``kits/``) stay unless ``kits``. ``dry_run``: what would
        go, nothing removed.
        """
        # deferred: see the module docstring
        from microagent.store.retention import builds_in_flight, keeper

        def waiting() -> None:
            self.say("cache prune: waiting for the builds in progress to finish")

        # what a build in flight uses is in no workspace record yet: prune after it ends
        with builds_in_flight(self.store, exclusive=not dry_run, on_wait=waiting):
            kept = self.cache_in_use()
            if older_than is not None:
                cutoff = time.time() - older_than
                kept |= {e.name for e in self.store.entries() if e.last_used > cutoff}
                everything = everything or max_bytes is None
            in_use = keeper(kept)

            def keep(name: str) -> bool:
                return in_use(name) or (not kits and name.startswith("kits/"))

            report = self.store.prune(max_bytes, all=everything, keep=keep, dry_run=dry_run)
            return self._prune_incomplete(report, keep, dry_run=dry_run)

    def _prune_incomplete(
        self, report: PruneReport, keep: Callable[[str], bool], *, dry_run: bool
    ) -> PruneReport:
        """The step records (and their root filesystems) a prune left naming a blob it
        removed go too: otherwise they count as built but can never be published again."""
        from microagent.store.content import PruneReport  # deferred: see the docstring
        from microagent.store.retention import left_incomplete  # deferred: see the docstring

        gone = {entry.name for entry in report.removed}
        names = left_incomplete(self.store, gone, keep)
        if not names:
            return report
        listed = {entry.name: entry for entry in self.store.entries()}
        extra = [listed[n] for n in names if n in listed and (dry_run or self.store.remove(n))]
        return PruneReport(report.removed + tuple(extra), report.garbage)

    def cache_in_use(self) -> set[str]:
        """Store entry names an existing workspace boots from: its step chain, root
        filesystem, captured files, disks and bundles."""
        from microagent.store.records import rootfs_entry  # deferred: see the docstring
        from microagent.store.retention import names_in_use  # deferred: see the docstring
        from microagent.workspace.disks import store_entries  # deferred: see the docstring

        keys, blobs, entries = [], [], set()
        for ws in self.workspaces:
            record = ws.record()
            keys.append(record.rootfs_key)
            blobs += [f.blob for f in record.files]
            entries |= store_entries(record) | {rootfs_entry(record.rootfs_key)}
            entries |= self._store_names(record.root_images)
        return names_in_use(self.store, keys, blobs) | entries

    def _store_names(self, paths: Iterable[Path]) -> set[str]:
        """The store entry names of ``paths`` that are in the store (a root's images)."""
        root = self.store.root
        return {str(p.relative_to(root)) for p in paths if p.is_relative_to(root)}

    def cache_verify(self, *, repair: bool = False) -> VerifyReport:
        """Check every blob, step record, root filesystem and shared disk or bundle image
        (``e2fsck -fn`` too); with ``repair`` remove what is wrong so the next build rebuilds
        it."""
        # deferred: see the module docstring
        from microagent.ext4.debugfs import check_image
        from microagent.store.retention import builds_in_flight
        from microagent.store.verify import verify
        from microagent.workspace.disks import stored_image_problem
        from microagent.workspace.templates import problem as template_problem

        def image(folder: Path) -> tuple[str, str] | None:
            return stored_image_problem(folder, check_image)

        checks = {"disks": image, "bundles": image, "templates": template_problem}
        if not repair:  # reads only: builds go on beside it (a rootfs in flight is in its grace)
            return verify(self.store, in_use=self.cache_in_use(), fsck=check_image, checks=checks)

        def waiting() -> None:
            self.say("cache verify --repair: waiting for the builds in progress to finish")

        # the same rule as prune: what a build in flight uses is in no workspace record yet
        with builds_in_flight(self.store, exclusive=True, on_wait=waiting):
            return verify(
                self.store, repair=True, in_use=self.cache_in_use(), fsck=check_image, checks=checks
            )

    def cache_export(
        self,
        directory: Path,
        *,
        key: str | None = None,
        spec: Path | None = None,
        tag: str = "latest",
        cache_from: Sequence[str] = (),
    ) -> tuple[str, PublishReport]:
        """Write built steps (and the image) into an OCI layout; return the key and report."""
        # deferred: see the module docstring
        from microagent.remotecache.publish import prepare, publish, record_files_and_config
        from microagent.remotecache.refs import open_cache, parse_cache_ref

        if spec is not None:
            pipeline = self.pipeline(cache_from=cache_from)
            # deferred: see the module docstring
            from microagent.compiler.overrides import RuntimeEnv

            outcome = pipeline.build(load(spec), RuntimeEnv())
            record_files_and_config(self.store, outcome.plan)
            key = outcome.plan.config_step.key
        if key is None:
            raise InvalidInputError("give a step key or a spec to export")
        full = self.full_key(key)
        publication = prepare(
            self.store,
            full,
            image_tag=tag,
            client=self.client,
            packed_images=self.settings.cache_rootfs,
            ram=self.settings.ram_stage,
        )
        target = open_cache(parse_cache_ref(f"oci:{directory.resolve()}"), self.client, write=True)
        return full, publish(publication, target, self.say)

    def full_key(self, text: str) -> str:
        """A step key from ``sha256:<hex>``, bare hex, or a unique prefix of 12+ hex digits."""
        hexpart = text.removeprefix("sha256:").lower()
        if len(hexpart) < 12 or hexpart.strip("0123456789abcdef"):
            raise InvalidInputError(
                f"bad key {text!r}", hint="give at least 12 hex digits of a key"
            )
        keys = self.store.root / "keys"
        found = sorted(p.stem for p in keys.glob(f"{hexpart}*.json")) if keys.is_dir() else []
        if len(found) != 1:
            why = "matches no step" if not found else f"matches {len(found)} steps"
            raise NotFoundError(f"key {text!r} {why} in the local store", hint="see `cache ls`")
        from microagent.digests import key_hex  # deferred: see the module docstring

        return "sha256:" + key_hex(found[0])

    def cache_import(self, directory: Path) -> ImportReport:
        # deferred: see the module docstring
        from microagent.remotecache.exchange import import_layout

        settings = self.settings
        return import_layout(
            self.store, directory, self.say, ram=settings.ram_stage, layered=settings.layer_disks
        )

    def kernel_list(self) -> list[GuestKit]:
        # deferred: see the module docstring
        from microagent.kit.guestkit import list_kits

        return list_kits(self.store)

    def kernel_install(self, mirror: str | None = None, suite: str | None = None) -> GuestKit:
        # deferred: see the module docstring
        from microagent.kit.debian import Mirror
        from microagent.kit.guestkit import install_kit

        settings = self.settings
        chosen = Mirror.of(
            mirror or settings.debian_mirror,
            suite or settings.debian_suite,
            settings.debian_keyring,
        )
        return install_kit(self.store, chosen, progress=self.say)

    def kernel_prune(self) -> list[GuestKit]:
        # deferred: see the module docstring
        from microagent.kit.guestkit import prune_kits

        return prune_kits(self.store)

    def doctor(self) -> Report:
        # deferred: see the module docstring
        from microagent.workspace.doctor import diagnose

        return diagnose(self.store)
