"""What ``cp`` reports (:meth:`microagent.api.Microagent.cp`): a module of its own, as ``cp``
is a start-up path that should build no other operation's report type (see
:mod:`microagent.workspace.reports`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from microagent.frozen import Frozen


@dataclass(frozen=True, eq=False, repr=False)
class CopyReport(Frozen):
    workspace: str
    direction: str  # "to-workspace" | "from-workspace"
    source: str
    target: str
    guest_path: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "workspace": self.workspace,
            "direction": self.direction,
            "source": self.source,
            "target": self.target,
            "guestPath": self.guest_path,
            "bytes": self.bytes,
        }
