"""The one shape of every ``--json`` document: ``schemas/cli-envelope.schema.json``.

``{"ok": bool, "schemaVersion": 1, ...payload}``. A failure (``ok: false``) always carries
``error``: ``{"kind", "message", "hint"?, "location"?, "diagnostics"?}``, where ``kind`` is a
:class:`~microagent.errors.MicroagentError` kind and the hint is never part of the message.
Commands hand over their payload (and the error of an outcome that failed, such as a
workspace that ended ``failed``); this module decides ``ok`` and places ``error``.

Streams (``logs -f --json``, ``audit -f --json``) print records, one JSON object per line,
rather than documents; an error that ends a stream is still a document.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from microagent.errors import MicroagentError, TimedOutError, VMError

SCHEMA_VERSION = 1
SCHEMA_FILE = "cli-envelope.schema.json"  # in microagent/schemas/


def document(payload: Mapping[str, Any], error: MicroagentError | None = None) -> dict[str, Any]:
    """``payload`` as an envelope: ``ok`` first (false when the payload says so or there is an
    ``error``), then ``schemaVersion``, then the payload's keys in their order."""
    ok = bool(payload.get("ok", True)) and error is None
    out: dict[str, Any] = {"ok": ok, "schemaVersion": SCHEMA_VERSION}
    for key, value in payload.items():
        if key not in ("ok", "schemaVersion", "error"):
            out[key] = value
        elif key == "error":
            out["error"] = None  # placed here; filled below when there is one
    if error is not None:
        out["error"] = error.to_json()
    elif not ok:
        out["error"] = _unexplained(payload.get("error"))
    return out


def _unexplained(error: object) -> dict[str, Any]:
    """A failure a command reported without an error object: never leave ``ok: false`` bare."""
    message = error.get("message") if isinstance(error, Mapping) else error
    return {"kind": MicroagentError.kind, "message": str(message or "the command failed")}


def dumps(payload: Mapping[str, Any], error: MicroagentError | None = None) -> str:
    """The envelope of ``payload`` as indented JSON text."""
    return json.dumps(document(payload, error), indent=2)


def failure(error: MicroagentError) -> str:
    """The document of a command that failed with ``error``."""
    return dumps({"ok": False}, error)


# Outcomes that are failures without an exception: the error object their document carries.


def workspace_failed(name: str, detail: str = "") -> VMError:
    """A workspace that ended ``failed`` (``start --wait``, ``wait``, ``status``)."""
    return VMError(
        f"workspace {name!r} failed" + (f": {detail}" if detail else ""),
        hint=f"`microagent logs {name}` shows its console, `microagent result {name}` its report",
    )


def still_running(name: str, state: str, timeout: float | None) -> TimedOutError:
    """A wait that ran out of time (``start --wait --timeout``, ``wait --timeout``)."""
    return TimedOutError(
        f"workspace {name!r} is still {state} after {timeout or 0:g}s",
        hint=f"it keeps running: `microagent wait {name}` waits again, "
        f"`microagent halt {name}` stops it",
    )


def workspace_outcome(
    payload: Mapping[str, Any],
    name: str,
    *,
    timeout: float | None = None,
    detail: str = "",
) -> MicroagentError | None:
    """The error of a workspace command's document that is not ``ok``: still running at the
    timeout (``timedOut``), else failed; None for one that is ok."""
    if payload.get("ok", True):
        return None
    state = str(payload.get("state") or "running")
    if payload.get("timedOut"):
        return still_running(name, state, timeout)
    return workspace_failed(name, detail or str(payload.get("detail") or ""))


def schema() -> dict[str, Any]:
    """The JSON Schema every ``--json`` document validates against."""
    from importlib import resources  # deferred: tempfile, zipfile...; only tests read it

    text = resources.files("microagent.schemas").joinpath(SCHEMA_FILE).read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded
