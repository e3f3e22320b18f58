"""Drive an example agent in serve mode: the host end of its mediation channel.

Listens on the workspace's mediation target, waits for the agent to connect (connections that
close without a word, like the runtime's `mediationReady` probe, are skipped), sends it
WorkRequests one after another and prints the signals and results as they come back, with
each request's latency. Then it closes the connection, which tells the agent to exit.

    microagent create --file examples/minimal-agent/microagent.yaml \\
        --credential anthropic --mediation 2048=127.0.0.1:9900
    python scripts/dispatch.py --listen 127.0.0.1:9900 examples/minimal-agent/demo/input-*.json
    python scripts/dispatch.py --listen 127.0.0.1:9900 --generate 5 --json

The wire protocol (examples/*/agent.py, serve mode): JSON objects, one per line, both ways.
The agent opens with a `ready` signal (or a `failed` signal if it cannot serve); each request
line is answered by zero or more signals and then exactly one WorkResult. A signal has a
`signal` key, a result does not. Only the standard library is used: this script speaks the
JSON, not the examples' pydantic models, so it runs with any Python 3.11+.

Exit status: 0 when every request completed, 1 when one did not, 2 when the exchange itself
failed (no agent, a broken connection, a line that is not JSON, a timeout).
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_LISTEN = "127.0.0.1:9900"
MAX_LINE_BYTES = 8 << 20  # a result carries the model's answer; bigger than a request may be
MAX_REQUEST_FILE_BYTES = 1 << 20
RECV_CHUNK = 1 << 16
SHOWN_CHARS = 300

Message = dict[str, Any]
Listener = Callable[[str, dict[str, Any]], None]  # event name, fields


class DispatchError(Exception):
    """The exchange with the agent failed; the message says how."""


# --- one connection, JSON lines both ways ----------------------------------------------------


class Peer:
    """An accepted connection: bounded line reads, whole-line writes."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address
        self._buffer = bytearray()
        self._eof = False

    def send_line(self, data: bytes) -> None:
        self.sock.sendall(data.rstrip(b"\n") + b"\n")

    def send(self, message: Message) -> None:
        self.send_line(json.dumps(message, separators=(",", ":")).encode())

    def receive_some(self) -> bool:
        """One recv into the buffer; False at end of stream."""
        data = self.sock.recv(RECV_CHUNK)
        if not data:
            self._eof = True
            return False
        self._buffer += data
        if b"\n" not in self._buffer and len(self._buffer) > MAX_LINE_BYTES:
            raise DispatchError(f"{self.address} sent a line longer than {MAX_LINE_BYTES} bytes")
        return True

    def take_message(self) -> Message | None:
        """The next complete line, parsed; None until one has arrived."""
        end = self._buffer.find(b"\n")
        if end < 0:
            return None
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        return parse_message(line, self.address)

    def read_message(self, deadline: float) -> Message | None:
        """The next message, waiting until the deadline; None when the agent has closed."""
        while (message := self.take_message()) is None:
            if self._eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DispatchError(f"no answer from {self.address} in time")
            self.sock.settimeout(remaining)
            try:
                self.receive_some()
            except TimeoutError:
                raise DispatchError(f"no answer from {self.address} in time") from None
        return message

    @property
    def silent(self) -> bool:
        return not self._buffer

    def finish(self, deadline: float) -> list[Message]:
        """Close our side (the agent's cue to exit) and read what is left until it closes."""
        self.sock.shutdown(socket.SHUT_WR)
        left: list[Message] = []
        while (message := self.read_message(deadline)) is not None:
            left.append(message)
        return left

    def close(self) -> None:
        self.sock.close()


def parse_message(line: bytes, source: str) -> Message:
    try:
        message = json.loads(line)
    except ValueError:
        raise DispatchError(f"{source} sent a line that is not JSON: {line[:80]!r}") from None
    if not isinstance(message, dict):
        raise DispatchError(f"{source} sent JSON that is not an object: {line[:80]!r}")
    return message


def is_signal(message: Message) -> bool:
    return "signal" in message


# --- listening and waiting for the agent -----------------------------------------------------


def parse_address(raw: str) -> tuple[str, int]:
    host, _, port = raw.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise DispatchError(f"expected HOST:PORT, got {raw!r}")
    return host.strip("[]"), int(port)


def listen(address: str) -> socket.socket:
    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise DispatchError(f"cannot listen on {address}: {exc.strerror or exc}") from None
    listener.listen(8)
    return listener


def bound_address(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _accept(listener: socket.socket, pending: dict[socket.socket, Peer]) -> None:
    sock, peer = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each line goes out at once
    pending[sock] = Peer(sock, f"{peer[0]}:{peer[1]}")


def _first_line(peer: Peer, drop: Callable[[str], None]) -> Message | None:
    """Read what a waiting connection sent; its first line, or None (dropped if it closed)."""
    try:
        more = peer.receive_some()
    except (OSError, DispatchError) as exc:
        drop(f"failed before a first line: {exc}")
        return None
    if (first := peer.take_message()) is not None:
        return first
    if not more:
        drop("connected and closed" if peer.silent else "closed without a complete line")
    return None


def wait_for_agent(
    listener: socket.socket, deadline: float, notify: Listener
) -> tuple[Peer, Message]:
    """Accept connections until one sends its first line; probes that just close are skipped.

    Several connections may be open at once (a probe that lingers must not hold up the
    agent), so they are watched together; the first to send a complete line is the agent.
    """
    pending: dict[socket.socket, Peer] = {}

    def dropper(peer: Peer) -> Callable[[str], None]:
        def drop(why: str) -> None:
            notify("probe", {"peer": peer.address, "detail": why})
            pending.pop(peer.sock).close()

        return drop

    try:
        while (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([listener, *pending], [], [], remaining)
            for sock in readable:
                if sock is listener:
                    _accept(listener, pending)
                elif (first := _first_line(pending[sock], dropper(pending[sock]))) is not None:
                    return pending.pop(sock), first
        raise DispatchError(f"no agent connected to {bound_address(listener)} in time")
    finally:
        for peer in pending.values():
            peer.close()


def check_ready(first: Message, peer: Peer) -> None:
    if first.get("signal") == "ready":
        return
    if first.get("signal") == "failed":
        raise DispatchError(f"the agent cannot serve: {first.get('error') or first}")
    raise DispatchError(f"{peer.address} did not start with a ready signal: {first}")


# --- requests ----------------------------------------------------------------------------------


@dataclass
class Exchange:
    """One request and what came back for it."""

    request_id: str
    latency: float
    result: Message
    signals: list[Message] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.result.get("status"))


def exchange(
    peer: Peer, line: bytes, request_id: str, deadline: float, notify: Listener
) -> Exchange:
    """Send one request line and read until its WorkResult arrives."""
    started = time.perf_counter()
    peer.send_line(line)
    notify("sent", {"request_id": request_id, "bytes": len(line)})
    signals: list[Message] = []
    while True:
        message = peer.read_message(deadline)
        elapsed = time.perf_counter() - started
        if message is None:
            raise DispatchError(f"the agent closed the connection before answering {request_id}")
        if is_signal(message):
            signals.append(message)
            notify("signal", {"after": elapsed, "message": message})
            continue
        notify("result", {"request_id": request_id, "latency": elapsed, "message": message})
        return Exchange(request_id, elapsed, message, signals)


def generated_request(number: int, content: str) -> Message:
    request_id = f"dispatch-{number:03d}"
    return {
        "request_id": request_id,
        "principal": {
            "name": "dispatch",
            "kind": "service",
            "verified": True,
            "verified_by": "scripts/dispatch.py",
            "authorization_scope": ["agent_work"],
        },
        "content": content,
        "constraints_version": 1,
        "audit_ref": f"audit://{request_id}",
    }


def load_request(path: Path) -> Message:
    try:
        if path.stat().st_size > MAX_REQUEST_FILE_BYTES:
            raise DispatchError(f"{path} is larger than {MAX_REQUEST_FILE_BYTES} bytes")
        return parse_message(path.read_bytes(), str(path))
    except OSError as exc:
        raise DispatchError(f"cannot read {path}: {exc.strerror}") from None


def plan_requests(files: list[Path], generate: int, content: str, repeat: int) -> list[Message]:
    """The requests to send: the files (or generated ones), `repeat` rounds of them.

    With more than one round, request ids get a `.N` suffix so that each stays unique.
    """
    base = [load_request(path) for path in files]
    base += [generated_request(n, content) for n in range(1, generate + 1)]
    if repeat == 1:
        return base
    return [
        {**request, "request_id": f"{request.get('request_id', 'request')}.{round_}"}
        for round_ in range(1, repeat + 1)
        for request in base
    ]


def request_line(request: Message) -> tuple[bytes, str]:
    return json.dumps(request, separators=(",", ":")).encode(), str(request.get("request_id"))


# --- output ------------------------------------------------------------------------------------


def shown(text: object, limit: int = SHOWN_CHARS) -> str:
    """Agent text made safe for a terminal: control characters escaped, long text cut."""
    raw = str(text)
    cut = raw if len(raw) <= limit else raw[:limit] + f" [... {len(raw) - limit} more]"
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in cut)


def _describe_signal(message: Message) -> str:
    parts = [str(message.get("signal")), str(message.get("request_id") or "")]
    extra = message.get("error") or message.get("detail")
    return " ".join(p for p in parts if p) + (f" ({shown(extra)})" if extra else "")


def summarize(exchanges: list[Exchange]) -> dict[str, Any]:
    latencies = [x.latency for x in exchanges]
    summary: dict[str, Any] = {
        "requests": len(exchanges),
        "completed": sum(x.status == "completed" for x in exchanges),
        "latencies": latencies,
    }
    if len(latencies) >= 2:
        rest = statistics.median(latencies[1:])
        summary |= {
            "first": latencies[0],
            "rest_median": rest,
            "first_over_rest": latencies[0] / rest,
        }
    return summary


def summary_text(summary: dict[str, Any]) -> str:
    text = f"{summary['completed']}/{summary['requests']} completed"
    if "rest_median" in summary:
        text += (
            f"; request 1 {summary['first']:.3f} s, requests 2..{summary['requests']} median "
            f"{summary['rest_median']:.3f} s (request 1 / rest = {summary['first_over_rest']:.1f}x)"
        )
    return text


def _result_line(fields: dict[str, Any]) -> str:
    result = fields["message"]
    answer = result.get("error") or result.get("content") or ""
    status, request_id = result.get("status"), result.get("request_id")
    return f"<- {request_id} {status} in {fields['latency']:.3f} s: {shown(answer)}"


HUMAN_LINES: dict[str, Callable[[dict[str, Any]], str]] = {
    "listening": lambda f: f"listening on {f['address']}; waiting for the agent",
    "probe": lambda f: f"probe from {f['peer']} ({f['detail']}); still waiting",
    "ready": lambda f: (
        f"agent {f['peer']} after {f['after']:.3f} s: {_describe_signal(f['message'])}"
    ),
    "sent": lambda f: f"-> {f['request_id']} ({f['bytes']} bytes)",
    "signal": lambda f: f"   +{f['after']:.3f} s  {_describe_signal(f['message'])}",
    "result": _result_line,
    "summary": summary_text,
}


def human_printer(out: Any = sys.stdout) -> Listener:
    def notify(event: str, fields: dict[str, Any]) -> None:
        if event == "error":
            print(f"dispatch: error: {fields['message']}", file=sys.stderr, flush=True)
            return
        format_line = HUMAN_LINES.get(event)
        line = format_line(fields) if format_line else f"{event}: {shown(fields)}"
        print(line, file=out, flush=True)

    return notify


def json_printer(out: Any = sys.stdout) -> Listener:
    def notify(event: str, fields: dict[str, Any]) -> None:
        print(json.dumps({"event": event, **fields}), file=out, flush=True)

    return notify


# --- the whole session ---------------------------------------------------------------------------


def serve_requests(
    listener: socket.socket,
    lines: Iterable[tuple[bytes, str]],
    notify: Listener,
    *,
    wait: float,
    timeout: float,
) -> list[Exchange]:
    """Wait for the agent, send every request line, then close and let the agent exit."""
    started = time.monotonic()
    peer, first = wait_for_agent(listener, started + wait, notify)
    try:
        check_ready(first, peer)
        after = time.monotonic() - started
        notify("ready", {"peer": peer.address, "after": after, "message": first})
        exchanges = [
            exchange(peer, line, request_id, time.monotonic() + timeout, notify)
            for line, request_id in lines
        ]
        for message in peer.finish(time.monotonic() + timeout):
            notify("late", {"message": message})  # nothing should come after the last result
        return exchanges
    finally:
        peer.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("requests", nargs="*", type=Path, help="WorkRequest JSON files, in order")
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"HOST:PORT (default {DEFAULT_LISTEN}; port 0 picks one)",
    )
    parser.add_argument(
        "--generate", type=int, default=0, metavar="N", help="also send N generated requests"
    )
    parser.add_argument(
        "--content", default="Reply with one short sentence.", help="content of generated requests"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, metavar="N", help="send the whole list N times"
    )
    parser.add_argument(
        "--wait", type=float, default=600.0, help="seconds to wait for the agent to connect"
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for each result"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per event on stdout")
    args = parser.parse_args(argv)
    if not args.requests and args.generate <= 0:
        parser.error("give request files or --generate N")
    if args.repeat < 1 or args.generate < 0:
        parser.error("--repeat must be at least 1 and --generate at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    notify = json_printer() if args.json else human_printer()
    try:
        lines = [
            request_line(r)
            for r in plan_requests(args.requests, args.generate, args.content, args.repeat)
        ]
        with listen(args.listen) as listener:
            notify("listening", {"address": bound_address(listener)})
            exchanges = serve_requests(
                listener, lines, notify, wait=args.wait, timeout=args.timeout
            )
    except (DispatchError, OSError) as exc:
        notify("error", {"message": str(exc)})
        return 2
    summary = summarize(exchanges)
    notify("summary", summary)
    return 0 if summary["completed"] == summary["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
