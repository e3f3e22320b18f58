"""Compile a spec into a content-addressed build plan.

Steps, in order: ``base`` (image digest + platform), one ``setup`` per command, ``files``
(tree digest of the declared files) and ``config`` (what each boot is told). Every key is
``sha256(canonical_json({planner, parent, kind, inputs}))``: a change invalidates its own step
and the steps after it, nothing before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from microagent.compiler import files as _files
from microagent.compiler.cachecontrol import CacheControl
from microagent.compiler.keys import BaseInputs, SetupInputs, StepKind, step_key
from microagent.compiler.lock import ResolvedImage
from microagent.compiler.refs import portable_ref
from microagent.compiler.spec import Spec
from microagent.frozen import Frozen


@dataclass(frozen=True, eq=False, repr=False)
class Step(Frozen):
    kind: StepKind
    key: str
    parent: str | None
    inputs: Mapping[str, Any]
    label: str

    @property
    def short_key(self) -> str:
        return self.key.removeprefix("sha256:")[:12]


@dataclass(frozen=True, eq=False, repr=False)
class BuildPlan(Frozen):
    image: ResolvedImage
    steps: tuple[Step, ...]
    files: _files.FileTree = field(repr=False)

    def of_kind(self, kind: StepKind) -> tuple[Step, ...]:
        return tuple(s for s in self.steps if s.kind is kind)

    @property
    def rootfs_step(self) -> Step:
        """The last step that shapes the root filesystem (last setup, else base)."""
        return [s for s in self.steps if s.kind.in_rootfs][-1]

    @property
    def config_step(self) -> Step:
        return self.steps[-1]


def _label(text: str, width: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _config_inputs(spec: Spec, runtime_env_keys: Iterable[str]) -> dict[str, Any]:
    inputs = _base_config_inputs(spec, runtime_env_keys)
    # Added only when declared, so the keys of specs without them stay what they were.
    if spec.mediation is not None:
        m = spec.mediation
        inputs["mediation"] = {"port": m.port, "target": m.target, "required": m.required}
    if spec.credentials:  # references and upstreams, never a value
        inputs["credentials"] = [c.to_json() for c in spec.credentials]
    if spec.network.allow:
        inputs["network"]["allow"] = list(spec.network.allow)
    if spec.health is not None:
        h = spec.health
        inputs["health"] = {
            "exec": list(h.exec),
            "intervalSeconds": h.interval_seconds,
            "timeoutSeconds": h.timeout_seconds,
            "retries": h.retries,
            "startPeriodSeconds": h.start_period_seconds,
        }
    return inputs


def _base_config_inputs(spec: Spec, runtime_env_keys: Iterable[str]) -> dict[str, Any]:
    net = spec.network
    return {
        "entrypoint": list(spec.command() or []),
        "workdir": spec.workdir,
        "hostname": spec.effective_hostname(),
        "env": dict(spec.env),
        "runtimeEnvKeys": sorted(set(runtime_env_keys)),
        "outputs": [{"name": o.name, "path": o.path} for o in spec.outputs],
        "resources": spec.effective_resources().to_json(),
        "restart": spec.restart.text,
        "network": {
            "mode": net.mode.value,
            "forwards": [
                {
                    "protocol": f.protocol,
                    "host": f.host,
                    "hostPort": f.host_port,
                    "guestPort": f.guest_port,
                }
                for f in net.forwards
            ],
        },
        "disks": [
            {"name": d.name, "path": str(d.path), "mountpoint": d.mountpoint, "mode": d.mode.value}
            for d in spec.disks + spec.bundles
        ],
    }


def compile_plan(
    spec: Spec, image: ResolvedImage, *, runtime_env_keys: Iterable[str] = ()
) -> BuildPlan:
    """The ordered, keyed steps for ``spec`` built on ``image``.

    ``runtime_env_keys`` are the *names* of ``--env`` variables; their values never reach a
    plan. Reads the declared files to hash them; touches nothing else.
    """
    steps: list[Step] = []

    def add(kind: StepKind, inputs: Mapping[str, Any], label: str) -> None:
        parent = steps[-1].key if steps else None
        steps.append(Step(kind, step_key(parent, kind, inputs), parent, inputs, label))

    base = BaseInputs(image.digest, image.platform).to_json()
    add(StepKind.BASE, base, _label(portable_ref(spec.image)))  # a layout: as written, normalised
    for setup in spec.setup_steps:
        add(StepKind.SETUP, SetupInputs(setup.run).to_json(), _label(setup.run))
    tree = _files.collect(spec.files, root=spec.base_dir)
    add(
        StepKind.FILES,
        {"tree": tree.digest, "entries": [i.to_json() for i in tree.items]},
        f"{len(tree.items)} {'entry' if len(tree.items) == 1 else 'entries'}, "
        f"{tree.total_bytes} {'byte' if tree.total_bytes == 1 else 'bytes'}",
    )
    config = _config_inputs(spec, runtime_env_keys)
    add(StepKind.CONFIG, config, _label(" ".join(config["entrypoint"]) or "(no entrypoint)"))
    return BuildPlan(image=image, steps=tuple(steps), files=tree)


# -- cache status ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class CachedStep(Frozen):
    """What a cache knows about a built step."""

    key: str
    kind: StepKind
    parent: str | None
    inputs: Mapping[str, Any]
    where: str = "local"


class StepCache(Protocol):
    """Read-only view of the build cache that planning needs."""

    def lookup(self, key: str) -> CachedStep | None: ...

    def children(self, parent: str | None, kind: StepKind) -> Sequence[CachedStep]: ...


@dataclass(frozen=True, eq=False, repr=False)
class StepStatus(Frozen):
    step: Step
    cached: bool
    where: str | None
    reason: str


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed in (["entries", "tree"], ["tree"]):
        return _entries_diff(old.get("entries", []), new.get("entries", []))
    if changed == ["run"]:
        return f"command changed (was: {_label(str(old.get('run')), 40)})"
    return "changed: " + ", ".join(changed) if changed else "inputs differ"


def _entries_diff(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str:
    before = {e["path"]: e for e in old}
    after = {e["path"]: e for e in new}
    notes = [f"added {p}" for p in sorted(set(after) - set(before))]
    notes += [f"removed {p}" for p in sorted(set(before) - set(after))]
    notes += [f"changed {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    shown = ", ".join(notes[:3]) + (f" (+{len(notes) - 3} more)" if len(notes) > 3 else "")
    return f"files changed: {shown}" if notes else "files changed"


def _miss_reason(step: Step, cache: StepCache, parent_hit: bool) -> str:
    if not parent_hit:
        return "an earlier step must be built first"
    siblings = cache.children(step.parent, step.kind)
    if siblings:
        return _diff(siblings[-1].inputs, step.inputs)
    if step.kind is StepKind.BASE:
        return "base image not pulled yet"
    return "not built yet"


def plan_status(
    plan: BuildPlan, cache: StepCache, control: CacheControl | None = None
) -> list[StepStatus]:
    """For every step: cached (and where) or to build, and why it missed; with ``control``
    (``--no-cache``, ``--no-cache-from N``) the setup steps it names are to build, saying so."""
    control = control or CacheControl()
    rebuild = control.rebuild_from(len(plan.of_kind(StepKind.SETUP)))
    out: list[StepStatus] = []
    parent_hit, number = True, 0
    for step in plan.steps:
        if step.kind is StepKind.SETUP:
            number += 1  # setup steps are numbered from 1, as --no-cache-from counts them
        hit = cache.lookup(step.key)
        if rebuild is not None and step.kind is StepKind.SETUP and number >= rebuild:
            was = "cached, not reused" if hit is not None else "not cached either"
            out.append(StepStatus(step, False, None, f"{control.flag}: rebuilt ({was})"))
            hit = None
        elif hit is not None:
            out.append(StepStatus(step, True, hit.where, "cached"))
        else:
            out.append(StepStatus(step, False, None, _miss_reason(step, cache, parent_hit)))
        parent_hit = hit is not None
    return out
