"""The guest agent's wire protocol (``ma-agent/1``): frames over one virtio-serial port.

The guest agent (``kit/agent/ma-agent.c``, started by the guest init beside the entrypoint)
and the supervisor speak it over the port :data:`PORT_NAME`; CLI clients (``exec``) speak the
same frames to the supervisor's ``exec.sock`` (:mod:`~microagent.runtime.agentlink`),
which relays them with the channel ids rewritten. The full description is
``docs/agent-protocol.md``; in short:

A frame is a 9-byte header -- payload length (u32, big-endian), channel (u32), type (u8) --
and then the payload. Payloads are at most :data:`MAX_PAYLOAD` bytes; a peer that sends a
longer one, or an unknown type, is cut off. Control payloads are JSON objects (at most
:data:`MAX_JSON` bytes, nested at most :data:`MAX_JSON_DEPTH` deep); data payloads are bytes.

Channel 0 is the link itself (HELLO, PING/PONG). Exec channels are chosen by the host
(1 .. 2**31-1); mediation channels by the guest (2**31 and up). Data flows under a window:
a sender keeps at most :data:`WINDOW` unacknowledged data bytes per channel and direction;
the receiver sends WINDOW frames (u32 byte count) as it hands data on. So a slow reader
stalls only its own channel, and neither side buffers more than a window per channel.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from microagent.errors import InvalidInputError
from microagent.fsutil import load_json_bounded

PROTOCOL = 1
PORT_NAME = "microagent.agent"  # the virtio-serial port the guest agent serves
HEADER = struct.Struct(">IIB")
MAX_PAYLOAD = 64 << 10  # one frame's payload (data is sent in pieces of at most this)
MAX_JSON = 64 << 10  # a control payload
MAX_JSON_DEPTH = 8
WINDOW = 256 << 10  # unacknowledged data bytes per channel and direction
GUEST_CHANNEL_BASE = 1 << 31  # channels the guest opens (mediation) are at or above this
MAX_CHANNEL = (1 << 32) - 1


class FrameType(enum.IntEnum):
    HELLO = 0x01  # both ways, channel 0: {"protocol": 1, ...}
    PING = 0x02  # host -> guest, channel 0: any bytes, echoed in PONG
    PONG = 0x03  # guest -> host
    EXEC = 0x10  # host -> guest: ExecRequest as JSON; opens the channel
    STARTED = 0x11  # guest -> host: {"pid": N}
    STDIN = 0x12  # host -> guest: data; an empty payload closes the command's stdin
    STDOUT = 0x13  # guest -> host: data (all output when the command has a terminal)
    STDERR = 0x14  # guest -> host: data
    RESIZE = 0x15  # host -> guest: {"rows": R, "cols": C}
    SIGNAL = 0x16  # host -> guest: {"signal": N}, sent to the command's process group
    EXIT = 0x17  # guest -> host: {"exitCode", "signal", "timedOut", "error"}; closes the channel
    WINDOW = 0x18  # both ways: u32 count of data bytes handed on (credit for the sender)
    CLOSE = 0x19  # both ways: the channel is gone (optional JSON {"error": ...})
    MED_OPEN = 0x20  # guest -> host: a guest connection to the mediation port, {"port": N}
    MED_OPENED = 0x21  # host -> guest: the host reached the target
    DATA = 0x22  # both ways on a mediation channel; an empty payload = no more data this way


@dataclass(frozen=True)
class Frame:
    channel: int
    type: FrameType
    payload: bytes = b""

    def encode(self) -> bytes:
        return encode(self.channel, self.type, self.payload)

    def json(self) -> dict[str, Any]:
        """The payload as a JSON object (bounded); InvalidInputError when it is not one."""
        return decode_json(self.payload)

    def count(self) -> int:
        """A WINDOW frame's byte count."""
        if len(self.payload) != 4:
            raise InvalidInputError("agent protocol: a WINDOW frame carries 4 bytes")
        return int.from_bytes(self.payload, "big")


def encode(channel: int, kind: FrameType, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes (at most {MAX_PAYLOAD})")
    if not 0 <= channel <= MAX_CHANNEL:
        raise ValueError(f"channel {channel} out of range")
    return HEADER.pack(len(payload), channel, int(kind)) + payload


def encode_json(channel: int, kind: FrameType, value: Mapping[str, Any]) -> bytes:
    return encode(channel, kind, json.dumps(value, separators=(",", ":")).encode())


def window(channel: int, count: int) -> bytes:
    return encode(channel, FrameType.WINDOW, count.to_bytes(4, "big"))


def decode_json(payload: bytes) -> dict[str, Any]:
    value = load_json_bounded(
        payload.decode("utf-8", "replace"), max_bytes=MAX_JSON, max_depth=MAX_JSON_DEPTH
    )
    if not isinstance(value, dict):
        raise InvalidInputError("agent protocol: a control payload must be a JSON object")
    return value


class FrameReader:
    """Splits a byte stream into frames; refuses oversized payloads and unknown types."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames = []
        while len(self._buf) >= HEADER.size:
            length, channel, kind = HEADER.unpack_from(self._buf)
            if length > MAX_PAYLOAD:
                raise InvalidInputError(f"agent protocol: a frame of {length} bytes")
            try:
                ftype = FrameType(kind)
            except ValueError:
                raise InvalidInputError(f"agent protocol: unknown frame type {kind:#x}") from None
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append(Frame(channel, ftype, bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)


@dataclass(frozen=True)
class ExecRequest:
    """What EXEC asks the guest to run. ``env`` adds to (or replaces in) the workspace's
    runtime environment; ``cwd`` None means /workspace if it exists, else /; ``user`` is a
    name or uid[:gid] looked up in the guest's /etc/passwd (None: root); ``timeout_ms`` None
    means no limit; ``stdin`` False gives the command /dev/null."""

    argv: tuple[str, ...]
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    tty: bool = False
    rows: int = 24
    cols: int = 80
    timeout_ms: int | None = None
    stdin: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "argv": list(self.argv),
            "env": dict(self.env or {}),
            "cwd": self.cwd,
            "user": self.user,
            "tty": self.tty,
            "rows": self.rows,
            "cols": self.cols,
            "timeoutMs": self.timeout_ms,
            "stdin": self.stdin,
        }


@dataclass(frozen=True)
class ExecExit:
    """How a command ended: ``exit_code`` follows the shell's rules (127 not found, 126 not
    executable, 124 timed out, 128+N killed by signal N)."""

    exit_code: int
    signal: int | None = None
    timed_out: bool = False
    error: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExecExit:
        code = data.get("exitCode")
        sig = data.get("signal")
        err = data.get("error")
        if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255:
            raise InvalidInputError("agent protocol: EXIT without an exit code in 0..255")
        return cls(
            exit_code=code,
            signal=sig if isinstance(sig, int) and not isinstance(sig, bool) else None,
            timed_out=data.get("timedOut") is True,
            error=err[:4096] if isinstance(err, str) else None,
        )
