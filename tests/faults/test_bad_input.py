"""Bad input at scale (issue 16 item 3): generated specs, malformed OCI documents and malformed
layer tars, through the library entry points the CLI uses.

- Specs: grammar-based mutations of the examples (hypothesis draws which node of the YAML tree
  to change and how, how to print it, and which text edits to make); every one is either a
  valid Spec or a SpecError whose every diagnostic says FILE:LINE:COL. Never another exception.
- OCI documents: a one-image OCI layout whose layout index, image index, manifest or config is
  malformed (with the digests above it fixed up, so the bad bytes reach the parser) or whose
  descriptors lie; ``pull_base`` from it answers a clear error of the tree, publishes no step
  record, no root filesystem and no temp file, and never writes into the layout.
- Layer tars: damaged headers, truncation, bad compression, pax damage and hostile entries;
  ``flatten`` either applies the layer inside its stage or refuses it with an IntegrityError,
  and nothing outside the stage changes.

Full scale (``MICROAGENT_FAULT_SCALE=full``): 10,000 specs, 1,000 documents, 1,000 tars.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microagent.build.base import pull_base
from microagent.cli import main
from microagent.compiler.loader import parse_spec
from microagent.compiler.spec import Spec
from microagent.errors import IntegrityError, MicroagentError, SpecError
from microagent.fsutil import TEMP_PREFIX, remove_any
from microagent.layers.apply import LayerSource, flatten
from microagent.oci import documents as oci
from microagent.store.content import Store

if TYPE_CHECKING:
    from conftest import Tally  # tests/faults/conftest.py

# the Reproduce column of docs/reliability.md
REPRODUCE = "MICROAGENT_FAULT_SCALE=full .venv/bin/pytest -q tests/faults/"


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SHOWN = "microagent.yaml"

# -- the spec grammar ----------------------------------------------------------------------------

RICH: dict[str, Any] = {
    "name": "rich-agent",
    "image": "python:3.13-slim",
    "profile": "medium",
    "restart": "on-failure:3",
    "entrypoint": ["python", "/app/agent.py"],
    "workdir": "/workspace",
    "shell": "/bin/sh",
    "hostname": "rich",
    "setup": ["pip install x", {"run": "echo hi"}],
    "files": [{"src": "agent.py", "dst": "/app/agent.py", "mode": "0644"}],
    "env": {"A": "b", "LEVEL": "3"},
    "resources": {"memoryMiB": 1024, "cpuCount": 2, "sizeMiB": 0, "headroomMiB": 64},
    "network": {"mode": "user", "forwards": [{"hostPort": 8080, "guestPort": 80}]},
    "mediation": {"port": 9900, "target": "127.0.0.1:9900"},
    "health": {"exec": ["true"], "intervalSeconds": 5},
    "outputs": [{"name": "result", "path": "/workspace/result.json"}],
}
NASTY: list[Any] = [
    None, True, False, 0, -1, 1, 2**63, -(2**70), 1.5, float("inf"), float("nan"), "", " ",
    "x" * 300, "../../etc/passwd", "/", "/abs/path", "a\nb", "\t", "\x00", "é✓", "~", "null",
    "yes", "0x1F", "1e999", "on-failure:0", "on-failure:1000", "127.0.0.1:99999", "tcp", "udp",
    "isolated", "user", "tiny", "huge", "*.example.com", "sha256:" + "0" * 64, [], {}, [None],
    ["x"], {"run": ""}, {"file": "../x"}, {"src": "agent.py"}, {"": ""}, [[[[["deep"]]]]],
]  # fmt: skip
KEYS = [
    "name", "image", "profile", "restart", "entrypoint", "workdir", "shell", "hostname", "setup",
    "setupFiles", "files", "env", "resources", "network", "mediation", "credentials", "health",
    "outputs", "disks", "bundles", "src", "dst", "mode", "run", "file", "memoryMiB", "cpuCount",
    "forwards", "allow", "hostPort", "guestPort", "port", "target", "exec", "path", "bogus",
    "Name", "imgae", "enviroment", "", "<<", "?",
]  # fmt: skip
TOKENS = [
    ":", ": ", "- ", "-", "[", "]", "{", "}", ",", '"', "'", "&a ", "*a", "!!str ", "!!int ",
    "!!python/object/apply:os.system [x] ", "? ", "#", "|", ">", "%YAML 1.1\n", "@", "`", "\t",
    "\n", "\n---\n", "<<: *a\n", "\x00", "\ufeff", "\\", "\x85", "\u2028", "~", "=", "&a [*a, *a]",
]  # fmt: skip
OPS = ("delete", "replace", "wrap_list", "wrap_map", "rename", "add_key", "duplicate", "empty")
EDITS = ("drop_line", "dup_line", "swap_lines", "indent", "dedent", "tab", "cut", "insert")


def _bases() -> list[tuple[str, dict[str, Any]]]:
    found = [
        (p.parent.name, yaml.safe_load(p.read_text()))
        for p in sorted(EXAMPLES.glob("*/microagent.yaml"))
    ]
    assert len(found) >= 3, "the examples are the grammar's seeds"
    return [*found, ("rich", RICH)]


def _paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*path, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*path, i))


def _mutate(doc: Any, op: str, where: int, value: Any, key: str) -> Any:
    """Apply one structural mutation at the ``where``-th node (pre-order) of ``doc``."""
    paths = list(_paths(doc))
    return _mutate_at(doc, paths[where % len(paths)], op, value, key)


def _mutate_at(doc: Any, path: tuple[Any, ...], op: str, value: Any, key: str) -> Any:
    if not path:  # the root itself
        return value if op == "replace" else ([doc] if op == "wrap_list" else doc)
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "replace":
        parent[last] = copy.deepcopy(value)
    elif op == "wrap_list":
        parent[last] = [parent[last]]
    elif op == "wrap_map":
        parent[last] = {key: parent[last]}
    elif op == "rename" and isinstance(parent, dict):
        parent[key or str(last)[::-1]] = parent.pop(last)
    elif op == "add_key" and isinstance(parent, dict):
        parent[key] = copy.deepcopy(value)
    elif op == "duplicate" and isinstance(parent, list):
        parent.insert(int(last), copy.deepcopy(parent[last]))
    elif op == "empty":
        parent[last] = type(parent[last])() if isinstance(parent[last], list | dict) else ""
    return doc


def _dump(doc: Any, style: int) -> str:
    if style == 0:
        return json.dumps(doc, allow_nan=True)
    flow = {1: False, 2: True, 3: None}[style]
    return yaml.safe_dump(doc, default_flow_style=flow, sort_keys=False, allow_unicode=True)


def _edit(text: str, edit: str, at: int, token: str) -> str:
    lines = text.split("\n")
    i = at % max(len(lines), 1)
    if edit == "drop_line":
        del lines[i]
    elif edit == "dup_line":
        lines.insert(i, lines[i])
    elif edit == "swap_lines":
        j = (i + 1) % len(lines)
        lines[i], lines[j] = lines[j], lines[i]
    elif edit == "indent":
        lines[i] = "  " + lines[i]
    elif edit == "dedent":
        lines[i] = lines[i][1:]
    elif edit == "tab":
        lines[i] = "\t" + lines[i]
    elif edit == "cut":
        return text[: at % (len(text) + 1)]
    else:
        pos = at % (len(text) + 1)
        return text[:pos] + token + text[pos:]
    return "\n".join(lines)


@dataclass(frozen=True)
class GeneratedSpec:
    seed: str
    text: str


@st.composite
def generated_specs(draw: st.DrawFn) -> GeneratedSpec:
    name, base = draw(st.sampled_from(_bases()))
    doc: Any = copy.deepcopy(base)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(OPS))
        where = draw(st.integers(0, 200))
        doc = _mutate(doc, op, where, draw(st.sampled_from(NASTY)), draw(st.sampled_from(KEYS)))
    text = _dump(doc, draw(st.integers(0, 3)))
    for _ in range(draw(st.integers(0, 2))):
        edit, at = draw(st.sampled_from(EDITS)), draw(st.integers(0, 5000))
        text = _edit(text, edit, at, draw(st.sampled_from(TOKENS)))
    return GeneratedSpec(name, text)


@dataclass
class SpecOutcomes:
    valid: int = 0
    located: int = 0
    unlocated: list[str] | None = None
    crashed: list[str] | None = None


def _check_located(error: SpecError, text: str) -> str | None:
    """Why ``error`` is not a properly located error, or None when it is."""
    # YAML breaks lines at \r, \x85, U+2028 and U+2029 too (and counts its marks so)
    lines = sum(text.count(b) for b in ("\n", "\r", "\x85", "\u2028", "\u2029")) + 2
    if not error.diagnostics:
        return "no diagnostics"
    for diag in error.diagnostics:
        loc = diag.location
        if loc is None or loc.file != SHOWN:
            return f"no file in {diag.render()!r}"
        whole_file = diag.message in ("the spec is empty",)
        if not whole_file and not (1 <= loc.line <= lines and loc.column >= 1):
            return f"no line:col in {diag.render()!r}"
        if not diag.message.strip():
            return "an empty message"
    rendered = error.render()
    if "Traceback" in rendered or not rendered.startswith(f"error: {SHOWN}"):
        return f"rendered as {rendered[:200]!r}"
    return None


def _parse_one(text: str, source: Path, outcomes: SpecOutcomes, tally: Tally) -> None:
    tally.runs += 1
    try:
        result = parse_spec(text, source, SHOWN)
    except SpecError as exc:
        why = _check_located(exc, text)
        if why is None:
            outcomes.located += 1
            return
        assert outcomes.unlocated is not None
        outcomes.unlocated.append(f"{why}\n--- spec:\n{text}")
        tally.corrupt += 1
        raise AssertionError(why) from exc
    except Exception as exc:  # anything else would be a traceback at the CLI
        assert outcomes.crashed is not None
        outcomes.crashed.append(f"{exc!r}\n--- spec:\n{text}")
        tally.tracebacks += 1
        raise
    assert isinstance(result, Spec)
    outcomes.valid += 1


def test_generated_specs_are_valid_or_a_located_error(
    scaled: Callable[[int, int], int], campaign: Callable[[str, str], Tally]
) -> None:
    tally = campaign(
        "bad-input/specs",
        REPRODUCE + "test_bad_input.py::test_generated_specs_are_valid_or_a_located_error",
    )
    wanted = scaled(300, 10_000)
    outcomes = SpecOutcomes(unlocated=[], crashed=[])
    source = EXAMPLES / "minimal-agent" / SHOWN  # its folder has the files the specs name
    ci = wanted < 10_000

    @settings(
        max_examples=wanted,
        deadline=None,
        database=None,
        derandomize=ci,
        suppress_health_check=list(HealthCheck),
    )
    @given(generated_specs())
    def run(spec: GeneratedSpec) -> None:
        tally.faults += 1
        _parse_one(spec.text, source, outcomes, tally)

    began = time.monotonic()
    run()
    tally.seconds = round(time.monotonic() - began, 1)
    tally.notes = f"{outcomes.valid} valid, {outcomes.located} located errors"
    assert tally.tracebacks == 0 and not outcomes.crashed, outcomes.crashed
    assert tally.corrupt == 0 and not outcomes.unlocated, outcomes.unlocated
    assert tally.runs >= wanted
    assert outcomes.valid + outcomes.located == tally.runs
    # the grammar must reach both sides, or it tests nothing
    assert outcomes.valid >= tally.runs // 50 and outcomes.located >= tally.runs // 2, outcomes


def test_generated_specs_through_validate_say_file_line_col_in_json(
    tmp_path: Path,
    scaled: Callable[[int, int], int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The same grammar through ``microagent --json validate``: exit 0 with ``ok``, or exit 2
    with an ``invalid_spec`` error whose location names the file, line and column."""
    project = tmp_path / "proj"
    shutil.copytree(EXAMPLES / "minimal-agent", project)
    spec_file = project / SHOWN
    seen = {0: 0, 2: 0}

    @settings(max_examples=scaled(25, 500), deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(generated_specs())
    def run(spec: GeneratedSpec) -> None:
        spec_file.write_text(spec.text, encoding="utf-8", errors="surrogatepass")
        capsys.readouterr()
        code = main(["--json", "validate", "-f", str(spec_file)])
        out = capsys.readouterr()
        doc = json.loads(out.out)
        assert code in (0, 2) and "Traceback" not in out.err, (code, out)
        seen[code] += 1
        if code == 2:
            error = doc["error"]
            assert error["kind"] == "invalid_spec", error
            location = error.get("location") or {}
            assert location.get("file") == str(spec_file), error
            assert location.get("line", 0) >= 1 or "empty" in error["message"], error
            assert all(d.get("location") for d in error["diagnostics"]), error

    run()
    assert seen[0] and seen[2], seen


# -- malformed OCI documents -------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _tar(entries: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


LAYER = _tar([("etc/hello", b"hello\n"), ("bin/tool", b"#!/bin/sh\n")])


def _image_docs(arch: str) -> dict[str, Any]:
    """The four documents of a one-layer image: layout index -> image index -> manifest ->
    config (each level refers to the one below by digest and size)."""
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [_sha(LAYER)]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_MANIFEST,
        "config": {"mediaType": oci.OCI_CONFIG, "digest": "", "size": 0},
        "layers": [{"mediaType": oci.OCI_LAYER_TAR, "digest": _sha(LAYER), "size": len(LAYER)}],
    }
    index = {
        "schemaVersion": 2,
        "mediaType": oci.OCI_INDEX,
        "manifests": [
            {
                "mediaType": oci.OCI_MANIFEST,
                "digest": "",
                "size": 0,
                "platform": {"os": "linux", "architecture": arch},
            }
        ],
    }
    layout = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": oci.OCI_INDEX,
                "digest": "",
                "size": 0,
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    return {"config": config, "manifest": manifest, "index": index, "layout": layout}


DOC_NASTY: list[Any] = [
    None, True, 0, -1, 2**64, 1.5, "", "x", "sha256:", "sha256:" + "z" * 64, "md5:abc",
    "sha256:" + "0" * 64, "sha256:" + "0" * 63, "../../../../etc/passwd", oci.OCI_LAYER_GZIP,
    oci.OCI_INDEX, oci.OCI_MANIFEST, oci.DOCKER_LIST, "application/octet-stream", [], {},
    [None], [{}], {"digest": None}, "linux", "arm64", [[[[[]]]]],
]  # fmt: skip
DOC_KEYS = [
    "schemaVersion", "mediaType", "config", "layers", "manifests", "digest", "size", "platform",
    "rootfs", "diff_ids", "architecture", "os", "annotations", "urls", "bogus",
]  # fmt: skip


def _flip(data: bytes, rng: random.Random) -> bytes:
    at = rng.randrange(len(data))
    return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]


def _deep(data: bytes, rng: random.Random) -> bytes:
    depth = rng.choice([100, 5_000, 200_000])
    return b'{"layers":' + b"[" * depth + b"]" * depth + b"}"


_BYTE_EDITS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "truncate": lambda data, rng: data[: rng.randrange(len(data))],
    "flip": _flip,
    "not_utf8": lambda data, rng: data[:1] + b"\xff\xfe" + data[1:],
    "deep": _deep,
    "huge": lambda data, rng: b'{"pad":"' + b"x" * (oci.MAX_DOCUMENT_BYTES + 10) + b'"}',
    "duplicate_key": lambda data, rng: data[:-1] + b',"layers":7,"manifests":7,"rootfs":7}',
    "nan": lambda data, rng: data.replace(b"[", b"[NaN,", 1).replace(b":2", b":Infinity", 1),
    "not_object": lambda data, rng: rng.choice([b"[]", b"null", b'"text"', b"42", b""]),
}
BYTE_EDITS = tuple(_BYTE_EDITS)


def _byte_edit(data: bytes, edit: str, rng: random.Random) -> bytes:
    return _BYTE_EDITS[edit](data, rng)


@dataclass
class DocCase:
    target: str  # which document: layout, index, manifest, config
    how: str


def _build_layout(folder: Path, docs: dict[str, Any], case: DocCase, rng: random.Random) -> None:
    """Write the image, with ``case`` applied to one document and its parents' descriptors
    fixed up to point at the damaged bytes (unless the case is a lying descriptor)."""
    blobs = folder / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (folder / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (blobs / _sha(LAYER)[7:]).write_bytes(LAYER)
    parent_of = {"config": ("manifest", "config"), "manifest": ("index", "manifests", 0)}
    parent_of["index"] = ("layout", "manifests", 0)
    for name in ("config", "manifest", "index", "layout"):
        data = _damaged(docs[name], case, rng) if name == case.target else _raw(docs[name])
        if name == "layout":
            (folder / "index.json").write_bytes(data)
            break
        blob = blobs / _sha(data)[7:]
        blob.write_bytes(data)
        holder, *where = parent_of[name]
        desc = docs[holder]
        for part in where:
            desc = desc[part]
        if isinstance(desc, dict):
            desc["digest"], desc["size"] = _sha(data), len(data)
            if case.how == "lie" and holder == _above(case.target):
                _lie(desc, rng)


def _above(target: str) -> str:
    return {"layout": "", "index": "layout", "manifest": "index", "config": "manifest"}[target]


def _lie(desc: dict[str, Any], rng: random.Random) -> None:
    """Make a well-formed descriptor tell an untruth about the blob it names."""
    choice = rng.randrange(4)
    if choice == 0:
        desc["size"] += rng.choice([-1, 1, 1000])
    elif choice == 1:
        desc["digest"] = _sha(b"another blob")  # not in the layout
    elif choice == 2:
        desc["digest"] = _sha(LAYER)  # a blob that is there, but not a document
        desc["size"] = len(LAYER)
    else:
        desc["mediaType"] = rng.choice([oci.OCI_CONFIG, "text/plain", oci.OCI_LAYER_GZIP])


def _raw(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _damaged(doc: Any, case: DocCase, rng: random.Random) -> bytes:
    if case.how == "lie":
        return _raw(doc)
    if case.how in BYTE_EDITS:
        return _byte_edit(_raw(doc), case.how, rng)
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 2)):
        paths = [p for p in _paths(doc) if p and _essential(p)] or [()]
        doc = _mutate_at(
            doc, rng.choice(paths), case.how, rng.choice(DOC_NASTY), rng.choice(DOC_KEYS)
        )
    return _raw(doc)


def _essential(path: tuple[Any, ...]) -> bool:
    """Whether a node matters to pulling the image: descriptors, diff_ids, the environment;
    not `schemaVersion`, annotations or a `mediaType` (the document's own shape decides)."""
    if "annotations" in path or "mediaType" in path:
        return False
    return path[0] in ("layers", "config", "manifests", "rootfs") and path[:2] != ("config", "Cmd")


def _doc_cases(rng: random.Random) -> Iterator[DocCase]:
    structural = ("delete", "replace", "wrap_list", "wrap_map", "rename", "empty")
    while True:
        target = rng.choice(["layout", "index", "manifest", "config"])
        how = rng.choice([*structural * 2, *BYTE_EDITS, "lie"])
        if how == "lie" and target == "layout":
            how = "replace"
        yield DocCase(target, how)


def _store_state(root: Path) -> tuple[list[str], list[str], list[str]]:
    """(step records, root filesystems, temp files) in a store."""
    if not root.exists():
        return [], [], []
    temps = [str(p) for p in root.rglob(f"{TEMP_PREFIX}*")]
    return (
        sorted(os.listdir(root / "keys")) if (root / "keys").is_dir() else [],
        sorted(os.listdir(root / "rootfs")) if (root / "rootfs").is_dir() else [],
        temps,
    )


def _blobs_verify(store: Store) -> list[str]:
    bad = []
    for path in (store.root / "blobs" / "sha256").glob("*"):
        if hashlib.sha256(path.read_bytes()).hexdigest() != path.name:
            bad.append(path.name)
    return bad


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_malformed_oci_documents_are_clear_errors_and_publish_nothing(
    scaled: Callable[[int, int], int],
    campaign: Callable[[str, str], Tally],
    tmp_path: Path,
) -> None:
    tally = campaign(
        "bad-input/oci-documents",
        REPRODUCE
        + "test_bad_input.py::test_malformed_oci_documents_are_clear_errors_and_publish_nothing",
    )
    wanted = scaled(150, 1_000)
    arch = _host_arch()
    began, tally.seed = time.monotonic(), 16_3_2
    rng = random.Random(tally.seed)
    problems: list[str] = []
    kinds: dict[str, int] = {}
    valid = 0
    for n, case in zip(range(wanted), _doc_cases(rng), strict=False):
        folder, store = tmp_path / f"layout-{n}", Store(tmp_path / f"store-{n}")
        _build_layout(folder, _image_docs(arch), case, rng)
        before = _tree(folder)
        tally.runs += 1
        tally.faults += 1
        try:
            base = pull_base(store, f"oci:{folder}:latest", ram=False)
        except MicroagentError as exc:
            kinds[exc.kind] = kinds.get(exc.kind, 0) + 1
            if exc.kind == "internal" or not exc.message or "Traceback" in exc.render():
                problems.append(f"{case}: unclear {exc.render()!r}")
            keys, rootfs, temps = _store_state(store.root)
            if keys or rootfs or temps:
                tally.corrupt += 1
                problems.append(f"{case}: left {keys} {rootfs} {temps}")
        except Exception as exc:  # a traceback at the CLI
            tally.tracebacks += 1
            problems.append(f"{case}: {exc!r}")
        else:  # what was damaged did not matter to the pull (an unused field): the right image
            valid += 1
            base.env_map()  # what create reads from the config
            if base.config.get("rootfs", {}).get("diff_ids") != [_sha(LAYER)]:
                problems.append(f"{case}: accepted with a config that is not the image's")
        if _tree(folder) != before:
            tally.corrupt += 1
            problems.append(f"{case}: wrote into the layout")
        tally.corrupt += len(_blobs_verify(store))
    tally.seconds = round(time.monotonic() - began, 1)
    tally.notes = f"{valid} harmless (the right image), errors by kind: {kinds}"
    assert tally.tracebacks == 0 and tally.corrupt == 0 and not problems, "\n".join(problems[:40])
    assert tally.runs == wanted
    assert set(kinds) <= {"integrity", "registry", "not_found", "invalid_input"}, kinds
    assert valid <= wanted // 5, f"{valid} of {wanted} were not malformed enough to matter"


def _host_arch() -> str:
    from microagent.compiler.refs import host_platform

    return host_platform().split("/")[1]


# -- malformed layer tars ----------------------------------------------------------------------

HOSTILE = [
    ("../escape", "file", ""), ("/abs/../../escape", "file", ""), ("a/../../escape", "file", ""),
    ("lnk", "symlink", "../.."), ("lnk/escape", "file", ""), ("hl", "hardlink", "../outside"),
    ("hl2", "hardlink", "/etc/passwd"), ("dev", "char", ""), ("blk", "block", ""),
    (".wh...", "file", ""), (".wh..wh..opq", "file", ""), ("d/.wh.x", "file", ""),
    ("x" * 300, "file", ""), ("/".join(["d"] * 200), "file", ""), ("", "file", ""),
    ("ok/\x00nul", "file", ""), ("abs", "symlink", "/"), ("abs/escape", "file", ""),
]  # fmt: skip
_TYPES = {"file": tarfile.REGTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}
_TYPES |= {"char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE, "dir": tarfile.DIRTYPE}


def _entries_tar(entries: list[tuple[str, str, str]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, kind, target in entries:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mtime = _TYPES[kind], target, 1_700_000_000
            data = b"data\n" if kind == "file" else b""
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _good_entries(rng: random.Random) -> list[tuple[str, str, str]]:
    names = ["etc", "etc/conf", "bin", "bin/sh", "usr/lib/x.so", "a b", "é"]
    picked = rng.sample(names, rng.randint(1, len(names)))
    return [(n, "dir" if n in ("etc", "bin") else "file", "") for n in picked]


def _set_field(data: bytes, offset: int, width: int, value: bytes) -> bytes:
    return data[:offset] + value.ljust(width, b"\0")[:width] + data[offset + width :]


def _header_edit(offset: int, width: int, values: list[bytes]) -> TarEdit:
    def edit(plain: bytes, rng: random.Random) -> bytes:
        header = 512 * rng.randrange(max(plain.count(b"ustar") // 2, 1))
        return _set_field(plain, header + offset, width, rng.choice(values))

    return edit


def _pax(plain: bytes, rng: random.Random) -> bytes:
    pax = _entries_tar([("p" * 120, "file", "")])  # a long name: a pax header comes first
    if rng.random() < 0.5:
        return pax.replace(b" path=", b"9 path=", 1)  # a wrong record length
    return pax.replace(b"p" * 120, b"../" * 39 + b"pxx", 1)  # a path that climbs out


def _packed(plain: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        packed = gzip.compress(plain, mtime=0)
    else:
        packed = zstandard.ZstdCompressor().compress(plain)
    if rng.random() < 0.5:
        return packed[: rng.randrange(4, len(packed))]
    at = rng.randrange(10, len(packed))
    return packed[:at] + bytes([packed[at] ^ 0x5A]) + packed[at + 1 :]


def _hostile(plain: bytes, rng: random.Random) -> bytes:
    entries = [*_good_entries(rng), *rng.sample(HOSTILE, rng.randint(1, 3))]
    return _entries_tar(entries, rng.choice([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))


TarEdit = Callable[[bytes, random.Random], bytes]
TAR_EDITS: dict[str, TarEdit] = {
    "checksum": _header_edit(148, 8, [b"%06o\0 " % n for n in (0, 1, 4095, 123456)]),
    "size_field": _header_edit(124, 12, [b"7777777", b"zz", b"-1", b"77777777777"]),
    "typeflag": _header_edit(156, 1, [bytes([n]) for n in (0, 7, 0x41, 0x4B, 0x4C, 0x78, 255)]),
    "truncate": lambda plain, rng: plain[: rng.randrange(1, len(plain))],
    "garbage_tail": lambda plain, rng: plain + rng.randbytes(rng.randrange(1, 3000)),
    "zero_blocks": lambda plain, rng: b"\0" * rng.choice([0, 512, 1024, 5000]),
    "pax": _pax,
    "packed": _packed,
    "wrong_magic": lambda plain, rng: b"\x1f\x8b" + rng.randbytes(rng.randrange(0, 600)),
    "hostile": _hostile,
    "long_name": lambda plain, rng: _entries_tar([("n/" * 2100 + "f", "file", "")]),
    "diff_id": lambda plain, rng: plain,  # intact, but the image claims another diff_id
}


def _malformed_tar(edit: str, rng: random.Random) -> tuple[bytes, str | None]:
    """A damaged layer and (for the diff_id case) the wrong diff_id it claims."""
    plain = _entries_tar(_good_entries(rng))
    data = TAR_EDITS[edit](plain, rng)
    return data, (_sha(plain + b"x") if edit == "diff_id" else None)


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in [*dirnames, *files]:
            p = Path(dirpath, name)
            st_ = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            out[str(p.relative_to(root))] = (st_.st_mode, st_.st_size, digest)
    return out


def _stage_is_contained(stage: Path, sentinel: Path) -> str | None:
    for dirpath, _dirs, files in os.walk(stage):
        for name in files:
            p = Path(dirpath, name)
            if p.is_symlink():
                continue
            if not p.resolve().is_relative_to(stage.resolve()):
                return f"{p} resolves outside the stage"
            if p.stat().st_ino == (sentinel / "secret").stat().st_ino:
                return f"{p} is a hard link to the sentinel"
    return None


def test_malformed_layer_tars_are_refused_and_write_nothing_outside_the_stage(
    scaled: Callable[[int, int], int],
    campaign: Callable[[str, str], Tally],
    tmp_path: Path,
) -> None:
    tally = campaign(
        "bad-input/layer-tars",
        REPRODUCE + "test_bad_input.py::"
        "test_malformed_layer_tars_are_refused_and_write_nothing_outside_the_stage",
    )
    wanted = scaled(300, 1_000)
    began, tally.seed = time.monotonic(), 16_3_3
    rng = random.Random(tally.seed)
    sentinel = tmp_path / "sentinel"
    (sentinel / "etc").mkdir(parents=True)
    (sentinel / "secret").write_text("keep")
    (tmp_path / "stages").mkdir()
    problems: list[str] = []
    refused = 0
    for n in range(wanted):
        edit = list(TAR_EDITS)[n % len(TAR_EDITS)]
        data, diff_id = _malformed_tar(edit, rng)
        stage = tmp_path / "stages" / "stage"  # a "../x" entry would land beside it
        before = _snapshot(tmp_path, skip=stage)
        source = LayerSource(
            f"fuzz-{n}", lambda d=data: io.BytesIO(d), _digest(diff_id) if diff_id else None
        )
        tally.runs += 1
        tally.faults += 1
        try:
            flatten(stage, [source])
        except IntegrityError as exc:
            refused += 1
            if f"fuzz-{n}" not in exc.message:
                problems.append(f"{edit}: the error does not name the layer: {exc.message}")
        except Exception as exc:
            tally.tracebacks += 1
            problems.append(f"{edit}: {exc!r}")
        if _snapshot(tmp_path, skip=stage) != before:
            tally.corrupt += 1
            problems.append(f"{edit}: something outside the stage changed")
        if stage.exists() and (why := _stage_is_contained(stage, sentinel)):
            tally.corrupt += 1
            problems.append(f"{edit}: {why}")
        remove_any(stage)
    assert tally.tracebacks == 0 and tally.corrupt == 0 and not problems, "\n".join(problems[:40])
    assert tally.runs == wanted
    tally.seconds = round(time.monotonic() - began, 1)
    tally.notes = f"{refused} refused, {wanted - refused} applied inside the stage"
    assert refused >= wanted // 2, f"only {refused} of {wanted} refused: the damage is too mild"


def _digest(text: str) -> Any:
    from microagent.digests import Digest

    return Digest.parse(text)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything here reads local bytes: no registry settings leak in."""
    monkeypatch.delenv("MICROAGENT_REGISTRY_MIRRORS", raising=False)
