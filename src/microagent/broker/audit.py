"""The audit log: one JSON object per line, appended by the gateway, read by ``audit``/``status``.

Entries never hold a key, a header value or a body: the writers pass only the fields listed in
docs/broker.md. The file is the user's only (0600) and is rotated once it passes
:data:`ROTATE_BYTES` (the previous file is kept as ``audit.jsonl.1``), so a chatty guest cannot
fill the disk with it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROTATE_BYTES = 16 << 20
FIELD_MAX = 512  # a string field longer than this is cut (paths, reasons, host names)


def timestamp(when: float | None = None) -> str:
    """RFC 3339 UTC with milliseconds."""
    when = time.time() if when is None else when
    ms = int(when * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{ms:03d}Z"


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > FIELD_MAX:
        return value[:FIELD_MAX] + "…"
    return value


class AuditLog:
    """Appends entries to ``path``; safe to share between threads."""

    def __init__(self, path: Path, rotate_bytes: int = ROTATE_BYTES) -> None:
        self.path = path
        self.rotate_bytes = rotate_bytes
        self._lock = threading.Lock()

    def write(self, entry: Mapping[str, Any]) -> None:
        record = {"time": timestamp(), **{k: _bounded(v) for k, v in entry.items()}}
        line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self._rotate_if_full()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def _rotate_if_full(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size >= self.rotate_bytes:
            self.path.replace(self.path.with_name(self.path.name + ".1"))
