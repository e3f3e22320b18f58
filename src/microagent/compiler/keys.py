"""Build-step keys and the typed inputs behind them.

Every key is ``sha256(canonical_json({planner, parent, kind, inputs}))``: a change to a step's
inputs changes its key and, through ``parent``, the keys of every step after it. The inputs of
``base`` and ``setup`` steps are built and read only through the types here, so the compiler
and the builder can never disagree on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from microagent.digests import canonical_json, sha256_digest
from microagent.errors import IntegrityError
from microagent.frozen import Frozen

PLANNER_VERSION = 1
SETUP_INTERPRETER = ("/bin/sh", "-eu", "-c")


class StepKind(Enum):
    BASE = "base"
    SETUP = "setup"
    FILES = "files"
    CONFIG = "config"

    @property
    def in_rootfs(self) -> bool:
        """Base and setup make the cached root filesystem; files and config never do."""
        return self in (StepKind.BASE, StepKind.SETUP)

    @property
    def adds_layer(self) -> bool:
        """Setup and files steps add one layer on top of their parent's."""
        return self in (StepKind.SETUP, StepKind.FILES)


def step_key(parent: str | None, kind: StepKind, inputs: Mapping[str, Any]) -> str:
    manifest = {"planner": PLANNER_VERSION, "parent": parent, "kind": kind.value, "inputs": inputs}
    return sha256_digest(canonical_json(manifest))


def inputs_digest(inputs: Mapping[str, Any]) -> str:
    """The digest of a step's inputs (what a published config step carries instead)."""
    return sha256_digest(canonical_json(dict(inputs)))


def _field(inputs: Mapping[str, Any], name: str, kind: StepKind) -> Any:
    try:
        return inputs[name]
    except (KeyError, TypeError):
        raise IntegrityError(f"{kind.value} step inputs have no {name!r}") from None


@dataclass(frozen=True, eq=False, repr=False)
class BaseInputs(Frozen):
    """A ``base`` step: the image digest (never a tag) and the platform."""

    digest: str
    platform: str

    def to_json(self) -> dict[str, str]:
        return {"digest": self.digest, "platform": self.platform}

    @property
    def key(self) -> str:
        return step_key(None, StepKind.BASE, self.to_json())

    @classmethod
    def of(cls, inputs: Mapping[str, Any]) -> BaseInputs:
        return cls(
            str(_field(inputs, "digest", StepKind.BASE)),
            str(_field(inputs, "platform", StepKind.BASE)),
        )


@dataclass(frozen=True, eq=False, repr=False)
class SetupInputs(Frozen):
    """A ``setup`` step: the command and the interpreter that runs it."""

    run: str
    interpreter: tuple[str, ...] = SETUP_INTERPRETER

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "interpreter": list(self.interpreter)}

    @property
    def argv(self) -> tuple[str, ...]:
        return (*self.interpreter, self.run)

    @classmethod
    def of(cls, inputs: Mapping[str, Any]) -> SetupInputs:
        interpreter = _field(inputs, "interpreter", StepKind.SETUP)
        if not isinstance(interpreter, list) or not all(isinstance(w, str) for w in interpreter):
            raise IntegrityError("setup step inputs: interpreter is not a list of strings")
        return cls(str(_field(inputs, "run", StepKind.SETUP)), tuple(interpreter))
