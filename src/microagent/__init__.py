"""microagent: AI-agent workspaces in Linux microVMs from one declarative file.

The short public API: :class:`Microagent` (every operation the CLI offers, over one
:class:`Settings`), loading a spec and compiling its content-addressed build plan, and the
error types a caller may catch. Names are imported on first use so that `import microagent`
(and the CLI's start-up) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from microagent.api import Microagent
    from microagent.compiler.keys import StepKind
    from microagent.compiler.loader import load_spec
    from microagent.compiler.lock import ResolvedImage
    from microagent.compiler.plan import BuildPlan, Step, compile_plan
    from microagent.compiler.spec import Spec
    from microagent.errors import Diagnostic, MicroagentError, SpecError
    from microagent.settings import Settings

__version__ = "0.1.0"

_HOMES = {
    "Microagent": "microagent.api",
    "Settings": "microagent.settings",
    "load_spec": "microagent.compiler.loader",
    "ResolvedImage": "microagent.compiler.lock",
    "BuildPlan": "microagent.compiler.plan",
    "Step": "microagent.compiler.plan",
    "StepKind": "microagent.compiler.keys",
    "compile_plan": "microagent.compiler.plan",
    "Spec": "microagent.compiler.spec",
    "Diagnostic": "microagent.errors",
    "MicroagentError": "microagent.errors",
    "SpecError": "microagent.errors",
}

__all__ = [
    "BuildPlan",
    "Diagnostic",
    "Microagent",
    "MicroagentError",
    "ResolvedImage",
    "Settings",
    "Spec",
    "SpecError",
    "Step",
    "StepKind",
    "__version__",
    "compile_plan",
    "load_spec",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'microagent' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
