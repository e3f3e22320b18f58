"""Reading a workspace's audit log: ``audit`` shows it, ``status`` counts it.

The gateway appends one JSON object per line to ``<run dir>/audit.jsonl`` (``broker/audit.py``)
and renames a full file to ``audit.jsonl.1``. Its strings come from the guest (paths, host
names), so reading is bounded where the bytes enter: a line longer than :data:`MAX_LINE` is
skipped without being held, and so is any line that is not a JSON object. Entries are read
lazily: a full log and its predecessor never sit in memory at once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from microagent.runtime.rundir import RunDir

AUDIT_NAME = "audit.jsonl"
MAX_LINE = 8192  # bytes; the gateway cuts its string fields long before this
CHUNK = 1 << 16
KINDS = frozenset({"broker", "egress"})

Entry = dict[str, Any]


def audit_path(run: RunDir) -> Path:
    """The workspace's audit log (the gateway writes it while the workspace runs)."""
    return run.path / AUDIT_NAME


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


class _Lines:
    """Splits a byte stream into lines; a line over MAX_LINE is dropped as it streams by."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> Iterator[bytes]:
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            piece = data[start:end]
            if not self._skipping and len(self._buf) + len(piece) <= MAX_LINE:
                yield bytes(self._buf) + piece
            self._buf.clear()
            self._skipping = False
            start = end + 1
        rest = data[start:]
        if self._skipping or len(self._buf) + len(rest) > MAX_LINE:
            self._buf.clear()
            self._skipping = True
        else:
            self._buf += rest

    def tail(self) -> bytes:
        """What is left after the last newline (a complete file's unterminated last line)."""
        line = b"" if self._skipping else bytes(self._buf)
        self._buf.clear()
        self._skipping = False
        return line


def parse_line(line: bytes) -> Entry | None:
    """The entry a line holds, or None: not UTF-8, not JSON, or not a JSON object."""
    if not line.strip() or len(line) > MAX_LINE:
        return None
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _read(fh: IO[bytes], lines: _Lines) -> Iterator[Entry]:
    while chunk := fh.read(CHUNK):
        for line in lines.feed(chunk):
            entry = parse_line(line)
            if entry is not None:
                yield entry


def _file_entries(path: Path) -> Iterator[Entry]:
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        return
    with fh:
        lines = _Lines()
        yield from _read(fh, lines)
        entry = parse_line(lines.tail())
        if entry is not None:
            yield entry


def entries(path: Path) -> Iterator[Entry]:
    """Every entry, oldest first: the rotated predecessor, then the current file."""
    yield from _file_entries(rotated(path))
    yield from _file_entries(path)


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class Tally:
    """Requests (broker calls and egress decisions), denials and bytes each way."""

    def __init__(self) -> None:
        self.requests = self.denied = self.bytes_in = self.bytes_out = 0

    def add(self, entry: Entry) -> None:
        if entry.get("kind") not in KINDS:
            return
        self.requests += 1
        self.denied += entry.get("decision") == "deny"
        self.bytes_in += _count(entry.get("bytesIn"))
        self.bytes_out += _count(entry.get("bytesOut"))

    def to_json(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "denied": self.denied,
            "bytesIn": self.bytes_in,
            "bytesOut": self.bytes_out,
        }


def summary(path: Path) -> dict[str, int]:
    """``{requests, denied, bytesIn, bytesOut}`` over the log and its predecessor."""
    tally = Tally()
    for entry in entries(path):
        tally.add(entry)
    return tally.to_json()


class _Tail:
    """The current file, read as it grows; after a rotation the renamed file is read to its
    end through the descriptor still open, then the new file from its start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[bytes] | None = None
        self._lines = _Lines()

    def read(self) -> Iterator[Entry]:
        if self._fh is None:
            try:
                self._fh = self.path.open("rb")
            except FileNotFoundError:
                return
        yield from _read(self._fh, self._lines)
        if self._replaced():
            yield from _read(self._fh, self._lines)  # written just before the rename
            self.close()
            self._lines = _Lines()
            yield from self.read()

    def _replaced(self) -> bool:
        assert self._fh is not None
        try:
            current = self.path.stat()
        except FileNotFoundError:
            return False  # renamed, no new file yet: keep reading the old one
        return current.st_ino != os.fstat(self._fh.fileno()).st_ino

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def follow(path: Path, *, stop: Callable[[], bool], poll: float = 0.3) -> Iterator[Entry]:
    """Every entry so far, then each new one as it is written, until ``stop()`` says so
    (asked after each pass that found the log quiet, so nothing written before is missed)."""
    tail = _Tail(path)
    try:
        yield from _file_entries(rotated(path))
        while True:
            found = False
            for entry in tail.read():
                found = True
                yield entry
            if not found:
                if stop():
                    yield from tail.read()  # the last lines before the stop
                    return
                time.sleep(poll)
    finally:
        tail.close()
