"""A scripted stand-in for the Anthropic Messages API, for the walkthrough test and the demo.

It speaks the real wire format (``POST /v1/messages``, no streaming) and answers like a model
working through the two demo requests with the example agent's tools:

- req-001: ``bash`` pip install rich -> ``write_file`` /workspace/biggest.py -> ``bash`` run it
  -> a final answer quoting the rendered table;
- req-002: ``read_file`` /workspace/biggest.py (it must be there from the first run) ->
  ``write_file`` the extended version -> ``bash`` run it -> a final answer.

The turn is derived from the conversation itself (how many tool results it holds), so the
server is stateless and any number of agents may use it. Run it standalone with
``python scripts/testenv/scripted_model.py --port 8089``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BIGGEST_V1 = '''\
"""Print the five largest files under /usr as a rich table."""
import os
from rich.console import Console
from rich.table import Table

def largest(root="/usr", count=5):
    sizes = []
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            try:
                if not os.path.islink(path):
                    sizes.append((os.path.getsize(path), path))
            except OSError:
                pass
    return sorted(sizes, reverse=True)[:count]

table = Table(title="Largest files under /usr")
table.add_column("Size (bytes)", justify="right")
table.add_column("Path")
for size, path in largest():
    table.add_row(f"{size:,}", path)
Console(width=100).print(table)
'''

BIGGEST_V2 = BIGGEST_V1.replace(
    'table.add_column("Path")\n',
    'table.add_column("Path")\ntable.add_column("Modified")\n',
).replace(
    '    table.add_row(f"{size:,}", path)\n',
    "    import datetime\n"
    "    stamp = datetime.datetime.fromtimestamp(os.path.getmtime(path)).strftime('%Y-%m-%d')\n"
    '    table.add_row(f"{size:,}", path, stamp)\n',
)

PLANS: Mapping[str, list[tuple[str, dict[str, Any]]]] = {
    "req-001": [
        ("bash", {"command": "pip install --no-cache-dir rich", "timeout_seconds": 600}),
        ("write_file", {"path": "/workspace/biggest.py", "content": BIGGEST_V1}),
        ("bash", {"command": "python /workspace/biggest.py", "timeout_seconds": 300}),
    ],
    "req-002": [
        ("read_file", {"path": "/workspace/biggest.py"}),
        ("write_file", {"path": "/workspace/biggest.py", "content": BIGGEST_V2}),
        ("bash", {"command": "python /workspace/biggest.py", "timeout_seconds": 300}),
    ],
}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if isinstance(block, Mapping):
            inner = block.get("text") or block.get("content") or ""
            parts.append(inner if isinstance(inner, str) else _text_of(inner))
    return "\n".join(parts)


def _which(messages: list[Mapping[str, Any]]) -> str:
    first = _text_of(messages[0].get("content")) if messages else ""
    return "req-002" if "req-002" in first or "last-modified" in first.lower() else "req-001"


def _tool_results(messages: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    found = []
    for message in messages:
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, list):
            found += [
                b for b in content if isinstance(b, Mapping) and b.get("type") == "tool_result"
            ]
    return found


def _final(which: str, results: list[Mapping[str, Any]]) -> str:
    last = _text_of(results[-1].get("content")) if results else ""
    if which == "req-002":
        earlier = _text_of(results[0].get("content")) if results else ""
        seen = (
            "found the earlier script" if "rich" in earlier else "did NOT find the earlier script"
        )
        return f"I {seen}, added a Modified column and reran it:\n\n{last}"
    return f"Installed rich, wrote /workspace/biggest.py and ran it:\n\n{last}"


def reply(body: Mapping[str, Any]) -> dict[str, Any]:
    """The next assistant message for a Messages API request body."""
    messages = list(body.get("messages") or [])
    which = _which(messages)
    results = _tool_results(messages)
    plan = PLANS[which]
    usage = {
        "input_tokens": 1200,
        "output_tokens": 90,
        "cache_read_input_tokens": 800,
        "cache_creation_input_tokens": 0 if results else 400,
    }
    base = {
        "id": f"msg_{which}_{len(results)}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "scripted"),
        "usage": usage,
        "stop_sequence": None,
    }
    if len(results) < len(plan):
        name, tool_input = plan[len(results)]
        block = {
            "type": "tool_use",
            "id": f"toolu_{which}_{len(results)}",
            "name": name,
            "input": tool_input,
        }
        return {**base, "content": [block], "stop_reason": "tool_use"}
    text = {"type": "text", "text": _final(which, results)}
    return {**base, "content": [text], "stop_reason": "end_turn"}


class _Handler(BaseHTTPRequestHandler):
    server_version = "scripted-model/1"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            body = None
        if not self.path.rstrip("/").endswith("/messages") or not isinstance(body, dict):
            self._send(
                404,
                {
                    "type": "error",
                    "error": {"type": "not_found_error", "message": f"no route {self.path}"},
                },
            )
            return
        expected = self.server.expect_key  # type: ignore[attr-defined]
        key = self.headers.get("x-api-key")
        self.server.keys.append(key)  # type: ignore[attr-defined]
        if expected is not None and key != expected:
            error = {"type": "authentication_error", "message": "invalid x-api-key"}
            self._send(401, {"type": "error", "error": error})
            return
        self.server.requests.append(body)  # type: ignore[attr-defined]
        self._send(200, reply(body))

    def _send(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", "req_scripted")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return


def _server(host: str, port: int, expect_key: str | None) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), _Handler)
    server.requests = []  # type: ignore[attr-defined]
    server.keys = []  # type: ignore[attr-defined]
    server.expect_key = expect_key  # type: ignore[attr-defined]
    return server


class ScriptedModel:
    """The server in a background thread; ``requests`` holds every body received and
    ``keys`` the ``x-api-key`` of every request (a credential broker adds the real one).
    With ``expect_key``, a request carrying any other key gets 401, as the real API does."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, expect_key: str | None = None):
        self.server = _server(host, port, expect_key)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.server.requests  # type: ignore[attr-defined, no-any-return]

    @property
    def keys(self) -> list[str | None]:
        return self.server.keys  # type: ignore[attr-defined, no-any-return]

    def __enter__(self) -> ScriptedModel:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument(
        "--expect-key-env",
        metavar="VAR",
        help="answer 401 unless x-api-key equals this variable's value (the broker's key)",
    )
    args = parser.parse_args()
    expected = os.environ.get(args.expect_key_env) if args.expect_key_env else None
    server = _server("127.0.0.1", args.port, expected)
    print(f"scripted model listening on http://127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
