"""What ``build``, ``start``, ``fork``, ``wait`` and ``kill`` report (the methods of
:class:`microagent.api.Microagent` of those names).

Kept out of :mod:`microagent.api`, as ``plan``'s and ``lock``'s are (in
:mod:`microagent.compiler.reports`) and ``cp``'s (in :mod:`microagent.workspace.copying`):
every frozen dataclass costs its module's import a fraction of a millisecond, so a command
builds only the report types it may return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microagent.build.pipeline import BuildOutcome


@dataclass(frozen=True)
class BuildReport:
    outcome: BuildOutcome
    published: list[dict[str, Any]]
    seconds: float
    spec_image: str = ""  # the image as the spec wrote it (how a layout is shown)

    def to_json(self) -> dict[str, Any]:
        # deferred: the compiler's reports, loaded by the commands that read a spec
        from microagent.compiler.reports import image_json

        plan, built = self.outcome.plan, self.outcome.built
        return {
            "ok": True,
            "image": image_json(plan.image, self.spec_image),
            "rootfsKey": built.key,
            "configKey": plan.config_step.key,
            "stepsBuilt": built.built,
            "stepsCached": built.cached,
            "setupBoots": self.outcome.boots,
            "steps": [{"kind": s.kind.value, "key": s.key, "label": s.label} for s in plan.steps],
            "remote": self.outcome.remote,
            "published": self.published,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class StartReport:
    workspace: str
    state: str
    exit_code: int | None = None  # set when the start waited for the entrypoint
    timed_out: bool = False  # waited, and the workspace was still live at the timeout
    detail: str = ""  # the state's detail, when the wait ended in a failure
    output_tail: tuple[str, ...] = ()  # the last lines of the output, after a failure

    @property
    def failed(self) -> bool:
        """The wait ended in a failure (a start that did not wait never failed here)."""
        return self.exit_code is not None and (self.state == "failed" or self.exit_code != 0)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": True, "workspace": self.workspace, "state": self.state}
        if self.timed_out:
            return {**out, "ok": False, "timedOut": True}
        if self.exit_code is None:
            return out
        out.update(ok=self.state != "failed", exitCode=self.exit_code)
        if self.failed:
            out.update(detail=self.detail, outputTail=list(self.output_tail))
        return out


@dataclass(frozen=True)
class WaitReport:
    workspace: str
    state: str
    timed_out: bool = False

    @property
    def exit_code(self) -> int:
        """0 stopped, halted (or never started), 1 failed, 124 still live at the timeout."""
        if self.timed_out:
            return 124
        return 1 if self.state == "failed" else 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.exit_code == 0, "workspace": self.workspace}
        out["state"] = self.state
        if self.timed_out:
            out["timedOut"] = True
        return out


@dataclass(frozen=True)
class KillReport:
    workspace: str
    state: str
    killed: bool  # False: nothing of the workspace was running

    def to_json(self) -> dict[str, Any]:
        return {"ok": True, "workspace": self.workspace, "state": self.state, "killed": self.killed}
