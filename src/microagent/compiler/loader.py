"""Turn a schema-valid YAML document into a :class:`Spec`, checking what a schema cannot.

Checks that need the file system or the whole document (files exist and stay inside the
spec's folder, no duplicate targets, reserved names, forwards with an isolated network, the
image reference) are collected, never raised one by one, so the user sees every problem at
once.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from microagent.compiler import _yaml
from microagent.compiler import schema as _schema
from microagent.compiler._yaml import Document, JsonPath, format_path
from microagent.compiler.credentials import Credential, credential_from_spec, env_clashes
from microagent.compiler.files import has_ext_superblock, resolve_inside
from microagent.compiler.refs import parse_any_ref
from microagent.compiler.spec import (
    RESERVED_DISK_NAMES,
    RESERVED_NAMES,
    Disk,
    DiskMode,
    FileEntry,
    Forward,
    Health,
    Mediation,
    Network,
    NetworkMode,
    Output,
    Profile,
    Resources,
    Restart,
    SetupStep,
    Spec,
    check_allow_entry,
    clean_guest_path,
    parse_target,
    publish_host_problem,
)
from microagent.errors import Diagnostic, InvalidInputError, SpecError, SpecNotFoundError

MAX_SPEC_BYTES = 1 << 20
MAX_SETUP_FILE_BYTES = 1 << 20
# Guest folders the init mounts or fills itself: no disk may be mounted on or under them.
GUEST_SYSTEM_DIRS = frozenset({"/proc", "/sys", "/dev", "/run"})
SPEC_NAMES = ("microagent.yaml", "microagent.yml")
NO_SPEC_HINT = (
    "pass an existing spec with --file PATH, or start from an example: "
    "examples/minimal-agent/microagent.yaml in the microagent sources"
)


class _Builder:
    """Reads fields out of the document, recording problems instead of stopping."""

    def __init__(self, doc: Document, source: Path) -> None:
        self.doc = doc
        self.source = source
        self.base = source.parent
        self.problems: list[Diagnostic] = []

    def problem(self, path: JsonPath, message: str, hint: str = "") -> None:
        self.problems.append(
            Diagnostic(message, self.doc.location(path), format_path(path) or "(top level)", hint)
        )

    def local_path(self, raw: str, path: JsonPath) -> Path | None:
        """A host path from the spec, resolved against the spec's folder with symlinks
        followed; None (and a problem) when it is absolute, ``~`` or leads outside it."""
        try:
            return resolve_inside(raw, self.base)
        except InvalidInputError as exc:
            self.problem(path, exc.message, exc.hint)
            return None

    def guest_path(self, raw: str, path: JsonPath) -> str:
        """A clean absolute guest path; ``..`` segments and NUL are refused."""
        if "\x00" in raw or "\n" in raw:
            self.problem(path, "guest paths must not contain NUL or newline characters")
        if ".." in raw.split("/"):
            self.problem(path, f"guest path {raw!r} contains '..'", "write the path it means")
        clean = clean_guest_path(raw)
        if clean == "/":
            self.problem(path, "the guest path must not be '/'")
        return clean

    # -- fields -------------------------------------------------------------------------

    def name(self, value: str | None) -> str | None:
        if value is not None and value.lower() in RESERVED_NAMES:
            self.problem(("name",), f"{value!r} is a reserved name", "pick another workspace name")
        return value

    def image(self, value: str) -> str:
        """The image reference as written, once it parses (nothing is looked up here)."""
        try:
            parse_any_ref(value, self.base)
        except InvalidInputError as exc:
            self.problem(("image",), exc.message, exc.hint)
        return value

    def setup(self, value: Any) -> tuple[SetupStep, ...]:
        entries = [value] if isinstance(value, str) else list(value or [])
        steps: list[SetupStep] = []
        for i, entry in enumerate(entries):
            path: JsonPath = ("setup",) if isinstance(value, str) else ("setup", i)
            step = self._setup_entry(entry, path)
            if step is not None:
                steps.append(step)
        return tuple(steps)

    def _setup_entry(self, entry: Any, path: JsonPath) -> SetupStep | None:
        if isinstance(entry, str):
            return SetupStep(entry, format_path(path))
        if "run" in entry:
            return SetupStep(entry["run"], format_path(path))
        return self._setup_from_file(entry["file"], (*path, "file"))

    def setup_files(self, value: list[str] | None) -> tuple[SetupStep, ...]:
        steps = [self._setup_from_file(raw, ("setupFiles", i)) for i, raw in enumerate(value or [])]
        return tuple(s for s in steps if s is not None)

    def _setup_from_file(self, raw: str, path: JsonPath) -> SetupStep | None:
        file = self.local_path(raw, path)
        if file is None:
            return None
        text = self._read_script(file, raw, path)
        if text is None:
            return None
        return SetupStep(text, f"{format_path(path)} ({raw})", file)

    def _read_script(self, file: Path, raw: str, path: JsonPath) -> str | None:
        try:
            info = file.stat()
            if not stat.S_ISREG(info.st_mode):
                self.problem(path, f"{raw!r} is not a regular file")
                return None
            if info.st_size > MAX_SETUP_FILE_BYTES:
                self.problem(path, f"{raw!r} is larger than 1 MiB")
                return None
            text = file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            self.problem(path, f"file {raw!r} does not exist", f"looked for {file}")
            return None
        except (OSError, UnicodeDecodeError) as exc:
            self.problem(path, f"cannot read {raw!r}: {exc}")
            return None
        if not text:
            self.problem(path, f"setup script {raw!r} is empty")
            return None
        return text

    def files(self, value: list[Mapping[str, str]] | None) -> tuple[FileEntry, ...]:
        out: list[FileEntry] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(value or []):
            entry = self._file_entry(item, ("files", i))
            if entry is None:
                continue
            if entry.dst in seen:
                self.problem(
                    ("files", i, "dst"),
                    f"{entry.dst} is already the target of files[{seen[entry.dst]}]",
                )
            seen.setdefault(entry.dst, i)
            out.append(entry)
        return tuple(out)

    def _file_entry(self, item: Mapping[str, str], path: JsonPath) -> FileEntry | None:
        src = self.local_path(item["src"], (*path, "src"))
        dst = self.guest_path(item["dst"], (*path, "dst"))
        mode = int(item["mode"], 8) if "mode" in item else None
        if src is None:
            return None
        try:
            info = src.stat()
        except FileNotFoundError:
            self.problem((*path, "src"), f"{item['src']!r} does not exist", f"looked for {src}")
            return None
        except OSError as exc:
            self.problem((*path, "src"), f"cannot read {item['src']!r}: {exc.strerror}")
            return None
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            self.problem((*path, "src"), f"{item['src']!r} is not a regular file or folder")
            return None
        return FileEntry(src=src, dst=dst, mode=mode)

    def env(self, value: Mapping[str, str] | None) -> Mapping[str, str]:
        return MappingProxyType(dict(sorted((value or {}).items())))

    def resources(self, value: Mapping[str, int] | None) -> Resources:
        raw = value or {}
        return Resources(
            memory_mib=raw.get("memoryMiB"),
            cpu_count=raw.get("cpuCount"),
            size_mib=raw.get("sizeMiB") or None,
            headroom_mib=raw.get("headroomMiB"),
        )

    def network(self, value: Mapping[str, Any] | None) -> Network:
        raw = value or {}
        mode = NetworkMode(raw.get("mode", "user"))
        forwards = tuple(
            Forward(
                host_port=f["hostPort"],
                guest_port=f["guestPort"],
                host=f.get("host", "127.0.0.1"),
                protocol=f.get("protocol", "tcp"),
            )
            for f in raw.get("forwards", [])
        )
        if forwards and mode is NetworkMode.ISOLATED:
            self.problem(
                ("network", "forwards"),
                "forwards need a network, but network.mode is isolated",
                "remove the forwards or use mode: user",
            )
        self._unique_binds(forwards)
        return Network(mode=mode, forwards=forwards, allow=self._allow(raw.get("allow") or []))

    def _allow(self, entries: list[str]) -> tuple[str, ...]:
        out: list[str] = []
        for i, entry in enumerate(entries):
            path: JsonPath = ("network", "allow", i)
            try:
                host = check_allow_entry(entry)
            except InvalidInputError as exc:
                self.problem(path, exc.message, exc.hint)
                continue
            if host in out:
                self.problem(path, f"{host} is listed twice")
            else:
                out.append(host)
        return tuple(out)

    def mediation(self, value: Mapping[str, Any] | None) -> Mediation | None:
        if value is None:
            return None
        try:
            host, port = parse_target(value["target"])
        except InvalidInputError as exc:
            self.problem(("mediation", "target"), exc.message, exc.hint)
            return None
        return Mediation(value["port"], host, port, value.get("required", False))

    def credentials(
        self, value: list[Mapping[str, Any]] | None, env: Mapping[str, str] | None
    ) -> tuple[Credential, ...]:
        """Each entry built (problems located at its keys), names unique, and no guest
        variable set twice (by two credentials, or by one and ``env``)."""
        built: list[tuple[int, Credential]] = []
        for i, entry in enumerate(value or []):
            cred, problems = credential_from_spec(entry)
            for p in problems:
                where: JsonPath = ("credentials", i, p.key) if p.key else ("credentials", i)
                self.problem(where, p.message, p.hint)
            if cred is None:
                continue
            clash = next((j for j, c in built if c.name == cred.name), None)
            if clash is not None:
                self.problem(
                    ("credentials", i, "name"),
                    f"credential {cred.name!r} is already declared in credentials[{clash}]",
                )
                continue
            built.append((i, cred))
        creds = tuple(c for _, c in built)
        for index, key, message in env_clashes(creds, sorted(env or {})):
            self.problem(
                ("credentials", built[index][0], key),
                message,
                "each guest variable is set once; pick another name",
            )
        return creds

    def health(self, value: Mapping[str, Any] | None) -> Health | None:
        if value is None:
            return None
        return Health(
            exec=tuple(value["exec"]),
            interval_seconds=value.get("intervalSeconds", 30),
            timeout_seconds=value.get("timeoutSeconds", 5),
            retries=value.get("retries", 3),
            start_period_seconds=value.get("startPeriodSeconds", 0),
        )

    def _unique_binds(self, forwards: tuple[Forward, ...]) -> None:
        for i, fwd in enumerate(forwards):
            problem = publish_host_problem(fwd.host)
            if problem:
                self.problem(("network", "forwards", i, "host"), problem, "e.g. 127.0.0.1")
            clash = next((f for f in forwards[:i] if f.conflicts_with(fwd)), None)
            if clash is not None:
                self.problem(
                    ("network", "forwards", i),
                    f"{fwd.bind} is forwarded twice"
                    + ("" if clash.bind == fwd.bind else f" (with {clash.bind})"),
                    "each host address and port is published once; 0.0.0.0 takes every address",
                )

    def outputs(self, value: list[Mapping[str, str]] | None) -> tuple[Output, ...]:
        out: list[Output] = []
        names: set[str] = set()
        for i, item in enumerate(value or []):
            if item["name"] in names:
                self.problem(("outputs", i, "name"), f"output {item['name']!r} is declared twice")
            names.add(item["name"])
            out.append(Output(item["name"], self.guest_path(item["path"], ("outputs", i, "path"))))
        return tuple(out)

    def disks(self, value: list[Mapping[str, str]] | None, key: str) -> tuple[Disk, ...]:
        out = [self._disk(item, (key, i)) for i, item in enumerate(value or [])]
        return tuple(d for d in out if d is not None)

    def _disk(self, item: Mapping[str, str], path: JsonPath) -> Disk | None:
        if item["name"].lower() in RESERVED_DISK_NAMES:
            self.problem((*path, "name"), f"disk name {item['name']!r} is reserved")
        bundle = path[0] == "bundles"
        if bundle and not item["path"].endswith((".tar", ".tar.gz", ".tgz")):
            self.problem((*path, "path"), "a bundle must be a .tar, .tar.gz or .tgz archive")
        mount = self.mountpoint(item["mountpoint"], (*path, "mountpoint"))
        host = self.local_path(item["path"], (*path, "path"))
        if host is None or not self._disk_source(host, item["path"], (*path, "path"), bundle):
            return None
        mode = DiskMode(item.get("mode", "ro"))
        where = self.doc.location((*path, "path"))
        return Disk(item["name"], host, mount, mode, format_path(path), where)

    def mountpoint(self, raw: str, path: JsonPath) -> str:
        """A guest path a disk can be mounted on: not in what the guest init manages."""
        mount = self.guest_path(raw, path)
        top = "/" + mount.split("/")[1]
        if top in GUEST_SYSTEM_DIRS:
            self.problem(
                path,
                f"cannot mount a disk on {mount}: {top} belongs to the guest system",
                "pick a mount point such as /data or /mnt/corpus",
            )
        return mount

    def _disk_source(self, host: Path, raw: str, path: JsonPath, bundle: bool) -> bool:
        """Whether the disk's source is a readable regular file (an ext2/3/4 image for a
        disk); otherwise a problem says what it is instead."""
        try:
            info = host.stat()
            if not stat.S_ISREG(info.st_mode):
                self.problem(path, f"{raw!r} is not a regular file")
                return False
            is_ext = has_ext_superblock(host)
        except FileNotFoundError:
            self.problem(path, f"{raw!r} does not exist", f"looked for {host}")
            return False
        except OSError as exc:
            self.problem(path, f"cannot read {raw!r}: {exc.strerror or exc}")
            return False
        if not bundle and not is_ext:
            self.problem(
                path,
                f"{raw!r} is not an ext4 file system image (no ext2/3/4 superblock)",
                "make one with `mke2fs -t ext4 -d DIR IMAGE 256M`, "
                "or list a .tar archive under `bundles:` instead",
            )
            return False
        return True

    def unique_disks(self, disks: tuple[Disk, ...]) -> None:
        names: set[str] = set()
        mounts: set[str] = set()
        for disk in disks:
            if disk.name in names:
                self.problem(("disks",), f"disk name {disk.name!r} is used twice")
            if disk.mountpoint in mounts:
                self.problem(("disks",), f"mount point {disk.mountpoint} is used twice")
            names.add(disk.name)
            mounts.add(disk.mountpoint)


def _entrypoint(value: Any) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    return tuple(value)


def build_spec(doc: Document, source: Path) -> Spec:
    """Build the dataclasses from a schema-valid document, or raise every problem found."""
    raw: Mapping[str, Any] = doc.value
    b = _Builder(doc, source)
    disks = b.disks(raw.get("disks"), "disks")
    bundles = b.disks(raw.get("bundles"), "bundles")
    b.unique_disks(disks + bundles)
    spec = Spec(
        source=source,
        name=b.name(raw.get("name")),
        image=b.image(raw.get("image", Spec.image)),
        profile=Profile(raw.get("profile", "small")),
        restart=Restart.parse(raw.get("restart", "never")),
        entrypoint=_entrypoint(raw.get("entrypoint")),
        workdir=raw.get("workdir"),
        shell=raw.get("shell", Spec.shell),
        hostname=raw.get("hostname"),
        setup=b.setup(raw.get("setup")),
        setup_files=b.setup_files(raw.get("setupFiles")),
        files=b.files(raw.get("files")),
        env=b.env(raw.get("env")),
        resources=b.resources(raw.get("resources")),
        network=b.network(raw.get("network")),
        mediation=b.mediation(raw.get("mediation")),
        credentials=b.credentials(raw.get("credentials"), raw.get("env")),
        health=b.health(raw.get("health")),
        warm=raw.get("warm") is True,
        outputs=b.outputs(raw.get("outputs")),
        disks=disks,
        bundles=bundles,
    )
    if b.problems:
        raise SpecError(b.problems)
    return spec


def find_spec_file(path: Path) -> Path:
    """``path`` itself, or the spec inside it when it is a folder."""
    if path.is_dir():
        for name in SPEC_NAMES:
            if (path / name).is_file():
                return path / name
        raise SpecNotFoundError(f"no microagent.yaml in {path}", hint=NO_SPEC_HINT)
    if not path.exists():
        raise SpecNotFoundError(f"spec file not found: {path}", hint=NO_SPEC_HINT)
    return path


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInputError(f"cannot read spec {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_SPEC_BYTES:
        raise InvalidInputError(f"spec {path} is larger than 1 MiB", hint="is this the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"spec {path} is not UTF-8 text") from exc


def load_spec(path: Path | str, *, display: str | None = None) -> Spec:
    """Load, validate and type a spec file; raise :class:`SpecError` listing every problem.

    ``display`` is the file name used in messages (default: the path as given).
    """
    source = find_spec_file(Path(path))
    shown = display or str(source)
    return parse_spec(_read_text(source), source.resolve(), shown)


def parse_spec(text: str, source: Path, shown: str) -> Spec:
    """Validate ``text`` as if read from ``source`` (messages name the file ``shown``)."""
    doc, problems = _yaml.parse_or_diagnose(text, shown)
    if doc is None:
        raise SpecError(problems)
    if not isinstance(doc.value, dict):
        problems.append(
            Diagnostic(
                "the spec must be a mapping of keys to values",
                doc.location(()),
                "(top level)",
                "start with `name: my-agent` on the first line",
            )
        )
        raise SpecError(problems)
    problems.extend(_schema.validate(doc))
    if problems:
        raise SpecError(problems)
    return build_spec(doc, source)
