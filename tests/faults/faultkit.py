"""Helpers for the kill -9 and concurrency campaigns: the real CLI run as subprocesses (each in
its own session, so SIGKILL reaches its whole process group), kills placed by a delay or a
progress marker, and what a killed process left behind split into *corrupt* entries (a goal of
0) and *leftovers* (temp files and locks of a killed writer: never served, collected later)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEFTOVER_KINDS = frozenset({"temp", "lock"})
LEFTOVER_PROBLEMS = frozenset({"orphaned", "stale", "leftover", "unreferenced"})


def microagent_argv() -> list[str]:
    """The installed ``microagent`` beside this interpreter, else ``python -m microagent``."""
    script = Path(sys.executable).with_name("microagent")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "microagent"]


@dataclass
class Done:
    """A finished (or killed) CLI process."""

    argv: list[str]
    code: int
    out: str
    err: str
    seconds: float

    def json(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.out)
        except ValueError:
            raise AssertionError(
                f"{self.argv}: no JSON document:\n{self.out}\n{self.err}"
            ) from None
        return data

    def describe(self) -> str:
        return f"{' '.join(self.argv[1:])} exited {self.code}\n{self.out[-2000:]}{self.err[-2000:]}"


@dataclass
class Cli:
    """``microagent`` run as subprocesses for one ``MICROAGENT_HOME``; every stderr is scanned
    for tracebacks (``tracebacks`` counts them, ``traceback_examples`` keeps the first few)."""

    home: Path
    cwd: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    tracebacks: int = 0
    traceback_examples: list[str] = field(default_factory=list)

    def env(self, **more: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env.update(more)
        env["MICROAGENT_HOME"] = str(self.home)
        return env

    def with_home(self, home: Path) -> Cli:
        """Another home, same project and environment; tracebacks counted here too."""
        other = Cli(home, self.cwd, dict(self.extra_env))
        other.tracebacks, other.traceback_examples = self.tracebacks, self.traceback_examples
        other._parent = self  # type: ignore[attr-defined]
        return other

    def _count(self, done: Done) -> None:
        root: Cli = self
        while hasattr(root, "_parent"):
            root = root._parent
        if "Traceback (most recent call last)" in done.err:
            root.tracebacks += 1
            if len(root.traceback_examples) < 3:
                root.traceback_examples.append(done.describe())
        self.tracebacks = root.tracebacks

    def run(self, *args: str, timeout: float = 120, env: Mapping[str, str] | None = None) -> Done:
        """``microagent --json ARGS`` to the end."""
        proc = self.spawn(*args, env=env)
        return self.finish(proc, timeout=timeout)

    def spawn(self, *args: str, env: Mapping[str, str] | None = None) -> Process:
        argv = [*microagent_argv(), "--json", *args]
        out = tempfile.TemporaryFile()  # noqa: SIM115 (closed by Process.collect)
        err = tempfile.TemporaryFile()  # noqa: SIM115 (closed by Process.collect)
        began = time.monotonic()
        popen = subprocess.Popen(
            argv,
            cwd=self.cwd,
            env=self.env(**dict(env or {})),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        return Process(popen, argv, out, err, began)

    def finish(self, proc: Process, *, timeout: float = 120) -> Done:
        try:
            code = proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.popen.wait()
            done = proc.collect(code)
            raise AssertionError(f"timed out after {timeout}s: {done.describe()}") from None
        done = proc.collect(code)
        self._count(done)
        return done

    def ok(self, *args: str, timeout: float = 120, env: Mapping[str, str] | None = None) -> Any:
        done = self.run(*args, timeout=timeout, env=env)
        assert done.code == 0, done.describe()
        return done.json()


@dataclass
class Process:
    """A running CLI process (its own session: SIGKILL to its group reaches its children)."""

    popen: subprocess.Popen[bytes]
    argv: list[str]
    out: Any
    err: Any
    began: float

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> bool:
        """SIGKILL the whole process group; True when the process was still running."""
        alive = self.alive()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        return alive

    def collect(self, code: int) -> Done:
        self.out.seek(0)
        self.err.seek(0)
        out = self.out.read().decode(errors="replace")
        err = self.err.read().decode(errors="replace")
        self.out.close()
        self.err.close()
        return Done(self.argv, code, out, err, time.monotonic() - self.began)


def kill_when(proc: Process, *, delay: float, marker: Callable[[], bool] | None = None) -> bool:
    """SIGKILL ``proc``'s group once ``marker()`` is true (polled every 2 ms) or, without a
    marker, after ``delay`` seconds; True when it was still running then (a real fault)."""
    deadline = time.monotonic() + delay
    while proc.alive():
        if marker is not None and marker():
            break
        if marker is None and time.monotonic() >= deadline:
            break
        if marker is not None and time.monotonic() >= deadline:
            break  # the marker never showed: kill at the deadline instead
        time.sleep(0.002)
    return proc.kill()


# -- what a killed process left: corrupt entries vs leftovers -------------------------------------


@dataclass
class Findings:
    """``cache verify`` problems split into corrupt ones (a goal of 0) and leftovers (temp
    files and locks a killed writer left; garbage, never served, collected later)."""

    corrupt: list[dict[str, Any]] = field(default_factory=list)
    leftover: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""


def split_problems(
    problems: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    corrupt, leftover = [], []
    for problem in problems:
        kind, what = str(problem.get("kind")), str(problem.get("problem"))
        is_leftover = kind in LEFTOVER_KINDS or what in LEFTOVER_PROBLEMS
        (leftover if is_leftover else corrupt).append(problem)
    return corrupt, leftover


def verify_store(cli: Cli) -> Findings:
    """``microagent cache verify --json`` on ``cli``'s home (exit 0 or 1 with a ``problems``
    list: anything else is a failure of the check itself)."""
    done = cli.run("cache", "verify")
    assert done.code in (0, 1), done.describe()
    corrupt, leftover = split_problems(list(done.json()["problems"]))
    return Findings(corrupt, leftover, "microagent cache verify --json")


def stray_processes(home: Path) -> list[int]:
    """Supervisors and VMM stand-ins recorded under ``home`` that are still alive."""
    found = []
    for path in home.glob("workspaces/*/runtime/runtime.json"):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text())
            for pid in (data.get("supervisorPid"), (data.get("vmm") or {}).get("pid")):
                if isinstance(pid, int) and pid > 1 and _alive(pid):
                    found.append(pid)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rpartition(")")[2].split()[0] == "Z":
            return False
    return True


def stop_strays(home: Path) -> None:
    for pid in stray_processes(home):
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
