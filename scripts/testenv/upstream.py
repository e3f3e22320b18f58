"""A recording HTTP upstream on the host's loopback, for the credential broker's tests.

    with Upstream(reply=b"ok") as upstream:       # GET and POST: 200 and the reply
        ...  # point a credential at f"http://127.0.0.1:{upstream.port}"
        upstream.requests[-1].headers["authorization"]

``reply`` is the body, or a function of the request that makes it.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Request:
    """One request as the upstream received it; header names are lower-cased."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes


class Upstream:
    """Answers every GET and POST with 200 and ``reply``, and records each request."""

    def __init__(
        self,
        reply: bytes | Callable[[Request], bytes] = b"ok",
        content_type: str | None = None,
    ) -> None:
        requests: list[Request] = []

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                request = Request(self.command, self.path, headers, body)
                requests.append(request)
                data = reply(request) if callable(reply) else reply
                self.send_response(200)
                if content_type is not None:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *_args: Any) -> None:
                return

        self.requests = requests
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Upstream:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.close()


def post_and_read(port: int, path: str, header: str, timeout: float = 20.0) -> bytes:
    """POST ``hi`` to 127.0.0.1:``port`` with one extra ``header`` line (``Name: value``),
    ``Connection: close``; all the server sent until it closed (status line included)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\n{header}\r\n"
            "Content-Length: 2\r\nConnection: close\r\n\r\nhi".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data
