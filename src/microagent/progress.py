"""Progress of long work as typed events, for whoever shows them (the library never prints).

Long operations take a ``say`` callback (``Callable[[str], None]``) and have always sent it
lines. A caller that wants more than lines (the CLI's live view: bytes, rates, elapsed time,
a setup step's last output lines) passes a :class:`Reporter` instead: a ``say`` that also has
an ``event`` method. :func:`emit` hands an event to ``event`` when there is one, else sends its
``line`` to ``say`` -- so a plain function keeps getting the lines it always got.

A task is one piece of work with a stable id (a blob's digest, a step's key): it starts, may
advance (bytes done of a total) and take notes (what it has just finished, a line a plain
caller gets as it always did; a live view shows it in the task's row), and ends done or
cached. :class:`Meter` turns a byte stream
being read into throttled ``ADVANCE`` events.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import BinaryIO, Protocol, runtime_checkable

from microagent.frozen import Frozen

Say = Callable[[str], None]
ADVANCE_EVERY = 0.1  # seconds between two ADVANCE events of one task (the last one always goes)


class TaskKind(Enum):
    PULL = "pull"  # a base image's blob downloaded
    CONVERT = "convert"  # image layers flattened into an ext4 root filesystem
    STEP = "step"  # a setup step run in a VM
    PUSH = "push"  # a blob uploaded to a registry or layout


class Phase(Enum):
    START = "start"
    ADVANCE = "advance"
    NOTE = "note"  # a detail of a running task, in ``line`` (e.g. "flattened ... in 1.2s")
    DONE = "done"
    CACHED = "cached"


@dataclass(frozen=True, eq=False, repr=False)
class ProgressEvent(Frozen):
    """One thing that happened to a task. ``done``/``total`` are bytes (``total`` None: not
    known, or not counted in bytes); ``elapsed`` seconds since the task started; ``line`` the
    text a caller that takes only lines gets ("" for ``ADVANCE``: nothing to say)."""

    task: str
    kind: TaskKind
    phase: Phase
    label: str
    done: int = 0
    total: int | None = None
    elapsed: float = 0.0
    line: str = ""


@runtime_checkable
class Reporter(Protocol):
    """A ``say`` that takes events too."""

    def __call__(self, message: str) -> None: ...

    def event(self, event: ProgressEvent) -> None: ...


def emit(say: Say | None, event: ProgressEvent) -> None:
    """Send ``event`` to ``say``: as an event to a :class:`Reporter`, else as its line."""
    if say is None:
        return
    if isinstance(say, Reporter):
        say.event(event)
    elif event.line:
        say(event.line)


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def rate(size: int, seconds: float) -> str:
    return f"{size / 1e6 / max(seconds, 1e-6):.0f} MB/s"


class Meter:
    """Counts the bytes of one task and reports them (``START`` now, ``ADVANCE`` at most every
    :data:`ADVANCE_EVERY` seconds, ``DONE`` from :meth:`finish`)."""

    def __init__(
        self,
        say: Say | None,
        task: str,
        kind: TaskKind,
        label: str,
        total: int | None = None,
        *,
        line: str = "",
    ) -> None:
        self.say, self.task, self.kind, self.label, self.total = say, task, kind, label, total
        self.done = 0
        self.began = self._last = time.monotonic()
        emit(say, self._event(Phase.START, line))

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def _event(self, phase: Phase, line: str) -> ProgressEvent:
        return ProgressEvent(
            self.task, self.kind, phase, self.label, self.done, self.total, self.elapsed, line
        )

    def add(self, count: int) -> None:
        self.at(self.done + count)

    def at(self, done: int) -> None:
        """``done`` bytes so far (an upload that starts over goes back to 0)."""
        self.done = done
        now = time.monotonic()
        if now - self._last >= ADVANCE_EVERY:
            self._last = now
            emit(self.say, self._event(Phase.ADVANCE, ""))

    def note(self, line: str) -> None:
        """A detail of the running task (a plain ``say`` gets ``line``, as any other line)."""
        emit(self.say, self._event(Phase.NOTE, line))

    def finish(self, line: str, *, cached: bool = False) -> None:
        """The task ended; ``line`` says how (what a plain ``say`` gets)."""
        emit(self.say, self._event(Phase.CACHED if cached else Phase.DONE, line))

    def reader(self, stream: BinaryIO) -> BinaryIO:
        """``stream``, counting what is read from it into this meter."""
        return _Counted(stream, self.add)  # type: ignore[return-value]


def report_cached(say: Say | None, task: str, kind: TaskKind, label: str, line: str) -> None:
    """A task that had nothing to do: its result was in the cache."""
    emit(say, ProgressEvent(task, kind, Phase.CACHED, label, line=line))


def reporting_position(stream: BinaryIO, sent: Sent | None) -> BinaryIO:
    """``stream`` (a file being uploaded from its start), telling ``sent`` how far it has
    been read; ``stream`` itself without a ``sent``."""
    if sent is None:
        return stream
    sent(0)
    position = 0

    def count(got: int) -> None:
        nonlocal position
        position += got
        sent(position)

    return _Counted(stream, count)  # type: ignore[return-value]


class _Counted:
    """A binary stream's ``read``/``readinto`` with every byte counted (the rest delegated)."""

    def __init__(self, stream: BinaryIO, count: Callable[[int], None]) -> None:
        self._stream, self._count = stream, count

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._count(len(data))
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        got = self._stream.readinto(buffer)  # type: ignore[attr-defined]
        self._count(got or 0)
        return int(got or 0)

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)

    def __enter__(self) -> _Counted:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stream.close()


Sent = Callable[[int], None]  # an upload's bytes sent so far (back to 0 when it starts over)


def upload(say: Say | None, digest: str, size: int, send: Callable[[Sent], bool]) -> bool:
    """Run ``send`` (an upload that returns False when the target had the blob; it reports
    its bytes to the callback it is given) as a ``PUSH`` task of ``size`` bytes: done with
    its rate, or cached."""
    meter = Meter(say, digest, TaskKind.PUSH, digest[7:19], size)
    sent = send(meter.at)
    meter.done = size if sent else 0
    took = meter.elapsed
    if sent:
        meter.finish(
            f"  {digest[7:19]}  {megabytes(size)}  {rate(size, took)}  {took:.1f}s  pushed"
        )
    else:
        meter.finish("", cached=True)  # the summary counts them
    return sent
