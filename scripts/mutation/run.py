"""Mutation testing of the guard modules with mutmut, on a copy of the repository.

``make mutation`` runs every module; ``make mutation MODULES="loader network"`` (or
``python scripts/mutation/run.py loader network``) runs some. Each module is mutated in its own
copy of the tree under a temporary folder (``git ls-files`` of the working tree, or ``--rev``
for a commit), so the checkout you work in is never touched. Only the fast tests that exercise
the module run against its mutants (see MODULES); no VM tests.

A module's figures are written to ``<out>/<module>.json`` and its surviving mutants, with their
diffs, to ``<out>/<module>-survivors.txt``; a markdown table of all modules run is printed at
the end. docs/testing.md says how to read them.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@dataclass(frozen=True)
class Module:
    """A guard module: the files mutated, the mutants kept (mutmut names, fnmatch globs; all of
    the files' mutants when empty) and the tests run against them."""

    files: tuple[str, ...]
    tests: tuple[str, ...]
    only: tuple[str, ...] = field(default=())


def _only(module: str, *functions: str) -> tuple[str, ...]:
    """mutmut's names for the mutants of ``functions`` (``f`` or ``Class.method``) of a module."""
    names = []
    for function in functions:
        owner, _, name = function.rpartition(".")
        mangled = f"x\u01c1{owner}\u01c1{name}" if owner else f"x_{name}"
        names.append(
            f"{module}.{mangled}__mutmut_*" if not name.endswith("*") else f"{module}.{mangled}"
        )
    return tuple(names)


MODULES: dict[str, Module] = {
    "layers": Module(
        files=("src/microagent/layers/apply.py",),
        # the guards: names, parent chains, links, whiteouts (not metadata and timestamps)
        only=_only(
            "microagent.layers.apply",
            "_Applier.split",
            "_Applier.check_component",
            "_Applier.open_dir",
            "_Applier.open_child_dir",
            "_Applier.link_from",
            "_Applier.hardlink",
            "_Applier.make_symlink",
            "_Applier.whiteout",
            "_Applier.opaque",
            "_Applier.refuse",
            "_guard",
        ),
        tests=(
            # not test_layers_export / _property: ext4 images and hypothesis, too slow per mutant
            "tests/unit/cache/test_layers_malicious.py",
            "tests/unit/cache/test_layers_flatten.py",
            "tests/security/test_guards_layers.py",
            "tests/unit/cache/test_mutants_layers.py",
        ),
    ),
    "store": Module(
        files=("src/microagent/store/content.py",),
        tests=(
            "tests/unit/cache/test_cache_store.py",
            "tests/unit/cache/test_mutants_store.py",
        ),
    ),
    "registry": Module(
        files=("src/microagent/oci/registry.py",),
        # the guards: credential scope, tokens, size caps, redaction, digests, redirects, resume
        only=_only(
            "microagent.oci.registry",
            "read_auths",
            "_auth_host",
            "_credentials",
            "_authority",
            "CredentialScope.of",
            "CredentialScope.allows",
            "CredentialScope._hosts",
            "_bearer_challenge",
            "_token_of",
            "read_capped",
            "_size",
            "_redacted",
            "_check_digest_header",
            "_verified",
            "_location",
            "_Resume.__call__",
        ),
        tests=(
            "tests/unit/oci",  # with test_mutants_registry.py
            "tests/integration/test_resolve.py",
            "tests/integration/test_registry_faults.py",
            "tests/security/test_credentials.py",
        ),
    ),
    "loader": Module(
        files=("src/microagent/compiler/loader.py",),
        # the checks: host and guest paths, setup files, duplicates, disks (not field copying)
        only=_only(
            "microagent.compiler.loader",
            "_Builder.local_path",
            "_Builder.guest_path",
            "_Builder._setup_from_file",
            "_Builder._read_script",
            "_Builder.files",
            "_Builder._file_entry",
            "_Builder._allow",
            "_Builder._unique_binds",
            "_Builder.outputs",
            "_Builder._disk",
            "_Builder.mountpoint",
            "_Builder._disk_source",
            "_Builder.unique_disks",
            "_read_text",
        ),
        # not test_fuzz / test_fastschema: hypothesis runs of a minute each, per mutant
        tests=(
            "tests/unit/compiler/test_loader.py",
            "tests/unit/compiler/test_invalid_corpus.py",
            "tests/unit/compiler/test_guards_spec.py",
            "tests/unit/compiler/test_spec_credentials.py",
            "tests/unit/compiler/test_plan.py",
            "tests/unit/compiler/test_mutants_loader.py",
        ),
    ),
    "disk-copy": Module(
        files=("src/microagent/ext4/overlay.py",),
        # copy-out and the path walk every copy goes through (copy-in's writes are not)
        only=_only(
            "microagent.ext4.overlay",
            "copy_out",
            "_walk",
            "_follow",
            "_merge",
            "guest_parts",
            "_check_bounds",
            "_finish_host_file",
            "_host_destination",
            "_regular_file",
            "_check_writable",
            "_host_source",
            "_here",
        ),
        tests=(
            "tests/unit/disk/test_disk_copy.py",
            "tests/unit/disk/test_disk_unprivileged.py",
            "tests/security/test_guards_cp.py",
            "tests/unit/disk/test_mutants_overlay.py",
        ),
    ),
    "network": Module(
        files=("src/microagent/runtime/network.py",),
        # the rules (not NetworkSandbox's process plumbing, which needs root: VM tier)
        only=_only(
            "microagent.runtime.network",
            "parse_resolvers",
            "parse_host_addresses",
            "_usable_resolver",
            "egress_policy",
            "iptables_rules",
            "ip6tables_rules",
            "slirp4netns_argv",
            "netns_exec",
            "_qemu_escape",
            "check_socket_path",
            "guestfwd_option",
            "netns_ports",
            "_check_port",
            "hostfwd_option",
            "relay_argv",
            "add_hostfwd_request",
            "_read_bounded",
            "_entries",
            "probe_bind",
            "_bind_error",
            "NetworkSandbox._policy",
        ),
        tests=(
            "tests/unit/runtime/test_network.py",
            "tests/unit/broker/test_addresses.py",
            "tests/security/test_network_policy.py",
            "tests/unit/runtime/test_mutants_network.py",
        ),
    ),
    "guest-events": Module(
        files=("src/microagent/runtime/control.py", "src/microagent/runtime/backend.py"),
        # backend.py holds much more than the exited-event reader: only that is mutated there
        only=(
            "microagent.runtime.control.*",
            *_only(
                "microagent.runtime.backend",
                "GuestResult.from_event",
                "_ExitedEvent.*",
                "_output_entry_ok",
            ),
        ),
        tests=(
            "tests/unit/runtime/test_control.py",
            "tests/unit/runtime/test_fake_guest.py",
            "tests/security/test_guards_guest.py",
            "tests/security/test_guards_exited_event.py",
            "tests/unit/runtime/test_mutants_guest_events.py",
        ),
    ),
}

# mutmut's exit codes per mutant (mutmut.stats.status_by_exit_code, copied so the report can
# be read without importing mutmut); anything else is "suspicious".
STATUS = {
    1: "killed",
    3: "killed",
    37: "killed",  # caught by the type checker (not used here)
    0: "survived",
    5: "no tests",
    33: "no tests",
    34: "skipped",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
    255: "timeout",
    -11: "segfault",
    -9: "segfault",
    None: "not checked",
}


def resolve(rev: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", rev + "^{commit}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def use_src_of(dest: Path, rev: str) -> None:
    """Replace the copy's src/ with ``rev``'s: a rerun mutates the code the first run did
    (mutants are numbered per function; other tree changes would renumber them)."""
    shutil.rmtree(dest / "src")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def copy_tree(dest: Path, rev: str | None) -> None:
    """The repository's files into ``dest``: a commit's tree, or the working tree's tracked and
    untracked-but-not-ignored files (what ``git status`` would show)."""
    dest.mkdir(parents=True)
    if rev is not None:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", rev],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "-co", "--exclude-standard"],
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        src = ROOT / os.fsdecode(raw)
        if not src.is_file():  # deleted in the working tree, not yet in the index
            continue
        target = dest / os.fsdecode(raw)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def configure(dest: Path, module: Module) -> list[str]:
    """Append the ``[tool.mutmut]`` table for ``module`` to the copy's pyproject.toml; returns
    the test paths that exist (a module's own test_mutants_* file may not be written yet)."""
    tests = [t for t in module.tests if (dest / t).exists()]
    also = sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in dest.iterdir()
        if p.name not in {"src", "tests", "mutants", ".git"}
    )
    pytest_args = ["-p", "no:cacheprovider", "-p", "isolate_cwd", "--hypothesis-seed=0", "-x", "-q"]
    table = "\n".join(
        [
            "",
            "[tool.mutmut]",
            'source_paths = ["src"]',
            f"only_mutate = {toml_list(list(module.files))}",
            f"also_copy = {toml_list(also)}",
            f"pytest_add_cli_args = {toml_list(pytest_args)}",
            f"pytest_add_cli_args_test_selection = {toml_list(tests)}",
            "timeout_multiplier = 4.0",
            "timeout_constant = 2.0",
            "use_git_change_detection = false",
            "",
        ]
    )
    with (dest / "pyproject.toml").open("a", encoding="utf-8") as fh:
        fh.write(table)
    return tests


def run_mutmut(dest: Path, names: Sequence[str], jobs: int, budget: float, log: Path) -> int | None:
    """``mutmut run`` in ``dest`` at low priority; None when it overran ``budget`` seconds
    (it is stopped; the mutants tested so far keep their results)."""
    env = {
        **os.environ,
        # subprocesses the tests start (python -m microagent ...) import the mutated tree too
        # (and the isolate_cwd plugin beside this script)
        "PYTHONPATH": os.pathsep.join([str(dest / "mutants" / "src"), str(HERE)]),
        "CI": "true",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    # the mutated tree's import path must exist before Python starts: a missing sys.path entry
    # is cached as "nothing here", and the tests would import the unmutated package instead
    (dest / "mutants" / "src").mkdir(parents=True, exist_ok=True)
    argv = ["nice", "-n", "10", sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*argv, *names],
            cwd=dest,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            return None
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop mutmut and the workers it forked (its own process group), politely first; the
    results of the mutants already tested are on disk."""
    for sig, grace in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # workers left behind by a mutmut that exited


def results(dest: Path, module: Module) -> dict[str, str]:
    """Mutant name -> status, for the module's kept mutants."""
    out: dict[str, str] = {}
    for name in module.files:
        meta = dest / "mutants" / (name + ".meta")
        if not meta.exists():
            continue
        codes = json.loads(meta.read_text(encoding="utf-8")).get("exit_code_by_key", {})
        for key, code in codes.items():
            if not module.only or any(fnmatch(key, pattern) for pattern in module.only):
                out[key] = STATUS.get(code, "suspicious")
    return out


def summary(name: str, statuses: dict[str, str], exit_code: int | None) -> dict[str, object]:
    counts = Counter(statuses.values())
    total = len(statuses)
    killed = counts["killed"]
    return {
        "module": name,
        "mutants": total,
        "killed": killed,
        "survived": counts["survived"],
        "timeout": counts["timeout"],
        "no_tests": counts["no tests"],
        "other": total - killed - counts["survived"] - counts["timeout"] - counts["no tests"],
        "killed_pct": round(100.0 * (killed + counts["timeout"]) / total, 1) if total else 0.0,
        "complete": exit_code == 0 and counts["not checked"] == 0,
        "mutmut_exit": exit_code,
    }


def mutant_sources(dest: Path, files: Sequence[str]) -> dict[str, str]:
    """Every function mutmut generated (mutants and originals) by its mangled name, read from
    the mutated files (``mutmut show`` would take a process and seconds per mutant)."""
    out: dict[str, str] = {}
    for name in files:
        path = dest / "mutants" / name
        if not path.exists():
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef) and "__mutmut_" in node.name:
                # the body (the def line differs anyway); get_source_segment is too slow here
                out[node.name] = "\n".join(lines[node.lineno : node.end_lineno])
    return out


def survivors_text(dest: Path, module: Module, statuses: dict[str, str]) -> str:
    """The diff of every mutant not killed (survived, no tests, suspicious, not checked)."""
    sources = mutant_sources(dest, module.files)
    chunks = []
    for key in sorted(k for k, s in statuses.items() if s not in {"killed", "timeout"}):
        mangled = key.rsplit(".", 1)[-1]
        original = sources.get(mangled.rsplit("__mutmut_", 1)[0] + "__mutmut_orig", "")
        diff = difflib.unified_diff(
            original.splitlines(), sources.get(mangled, "").splitlines(), lineterm="", n=0
        )
        body = [line for line in diff if not line.startswith(("---", "+++", "@@"))]
        chunks.append(f"## {key} ({statuses[key]})\n" + "\n".join(body) + "\n")
    return "\n".join(chunks)


def run_module(name: str, args: argparse.Namespace, work: Path, out: Path) -> dict[str, object]:
    module = MODULES[name]
    dest = work / name
    copy_tree(dest, args.rev)
    src_rev = resolve(args.rev or "HEAD")
    if args.rerun:
        last = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
        src_rev = last.get("src_commit", src_rev)
        use_src_of(dest, src_rev)
    tests = configure(dest, module)
    print(f"[{name}] mutating {', '.join(module.files)} in {dest}", flush=True)
    print(f"[{name}] tests: {' '.join(tests)}", flush=True)
    started = time.monotonic()
    before: dict[str, str] = {}
    names: Sequence[str] = module.only
    if args.rerun:  # only the mutants the last run did not kill; its kills stand
        before = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))["statuses"]
        names = sorted(k for k, v in before.items() if v not in {"killed", "timeout"})
        print(f"[{name}] testing again the {len(names)} mutants not killed last time", flush=True)
    code = 0
    if names or not args.rerun:  # no names on a first run: all of the files' mutants
        code = run_mutmut(dest, names, args.jobs, args.budget, out / f"{name}.log")
    now = results(dest, module)
    statuses = {**before, **{k: now[k] for k in names if k in now}} if args.rerun else now
    row = summary(name, statuses, code)
    row["seconds"] = round(time.monotonic() - started)
    print(f"[{name}] {json.dumps(row)}", flush=True)
    row["src_commit"] = src_rev  # the working tree's own changes are not in it
    row["statuses"] = dict(sorted(statuses.items()))
    (out / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    (out / f"{name}-survivors.txt").write_text(
        survivors_text(dest, module, statuses), encoding="utf-8"
    )
    if not args.keep:
        shutil.rmtree(dest, ignore_errors=True)
    return row


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| module | mutants | killed | survived | timeout | no tests | % killed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pct = f"{r['killed_pct']}" + ("" if r["complete"] else " (incomplete)")
        lines.append(
            f"| {r['module']} | {r['mutants']} | {r['killed']} | {r['survived']} | "
            f"{r['timeout']} | {r['no_tests']} | {pct} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=", ".join(MODULES))
    parser.add_argument("--rev", help="mutate this commit's tree instead of the working tree")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument(
        "--budget", type=float, default=3600, help="seconds per module before it is stopped"
    )
    parser.add_argument("--out", type=Path, help="where figures go (default: under the work dir)")
    parser.add_argument("--keep", action="store_true", help="keep each module's copy")
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="test again only the mutants <out>/MODULE.json says were not killed (after adding "
        "tests), and merge",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    names = args.modules or list(MODULES)
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        print(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(MODULES)}")
        return 2
    if args.rerun and args.out is None:
        print("--rerun needs --out: the folder holding the last run's MODULE.json")
        return 2
    work = Path(tempfile.mkdtemp(prefix="microagent-mutation-"))
    out = (args.out or work / "results").resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_module(name, args, work, out) for name in names]
    print(table(rows))
    print(f"figures and survivors: {out}")
    below = [r["module"] for r in rows if float(str(r["killed_pct"])) < 85.0]
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
