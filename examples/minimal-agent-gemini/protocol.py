"""Wire shapes exchanged between an example agent and whoever drives it.

The same models travel over any transport: today a file pair (`/workspace/input.json` in,
`/workspace/result.json` out) with lifecycle signals as JSON lines on stderr; later a mediation
channel. Every model is immutable (`frozen`) and rejects unknown fields (`extra="forbid"`), so
a misspelt key in a request is an error rather than something silently ignored.

This file is identical in every example agent; a test keeps the copies in step.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PrincipalKind = Literal["user", "agent", "service"]
ContentKind = Literal["text", "json", "structured"]
WorkStatus = Literal["completed", "failed", "denied"]
SignalKind = Literal["ready", "accepting", "working", "completed", "failed"]


class Principal(BaseModel):
    """Who asked for the work, and whether an upstream gateway vouched for them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    kind: PrincipalKind
    verified: bool
    verified_by: str | None = None
    authorization_scope: tuple[str, ...] = ()


class WorkBounds(BaseModel):
    """Optional limits the requester places on one piece of work."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_duration_seconds: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_tool_calls: int | None = Field(default=None, ge=0)


class WorkRequest(BaseModel):
    """One task for the agent. `content` is the user's task, not operator instructions."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str = Field(min_length=1)
    principal: Principal
    content: str
    content_kind: ContentKind = "text"
    constraints_version: int = Field(default=0, ge=0)
    bounds: WorkBounds | None = None
    metadata: dict[str, Any] | None = None
    capabilities: tuple[str, ...] | None = None
    submitted_at: datetime | None = None
    audit_ref: str | None = None


class Usage(BaseModel):
    """What the work cost: model tokens (including prompt-cache traffic), tool calls, turns."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)
    cache_read_input_tokens: int = Field(default=0, ge=0)
    cache_creation_input_tokens: int = Field(default=0, ge=0)
    tool_calls: int = Field(default=0, ge=0)
    turns: int = Field(default=0, ge=0)


class WorkResult(BaseModel):
    """The agent's answer to one WorkRequest; written even when the work failed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str = Field(min_length=1)
    status: WorkStatus
    content: str = ""
    error: str | None = None
    usage: Usage | None = None
    completed_at: datetime
    audit_ref: str | None = None


class Constraints(BaseModel):
    """The operator's policy snapshot the agent runs under (baked in at /agent/constraints.json)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = Field(ge=0)
    hash: str = Field(min_length=1)
    effective_at: datetime
    payload_ref: str = Field(min_length=1)


class LifecycleSignal(BaseModel):
    """A progress marker; distinguishable from a WorkResult by its `signal` key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    signal: SignalKind
    agent_id: str = Field(min_length=1)
    observed_at: datetime
    request_id: str | None = None
    detail: str | None = None
    error: str | None = None
