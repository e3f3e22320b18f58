"""``init``: scaffold a working agent project from the templates shipped in the package.

The templates (``microagent/templates/init``) are the example agents of the sources
(``examples/minimal-agent``, ``-openai``, ``-gemini``) with the project's name put in: a
project made with the example's name is that example, file for file, except the README
(tests/cli/test_init.py holds them together). A name ending ``.j2`` is rendered with jinja2;
any other template is copied as it is.

Nothing is overwritten: every file is checked first, and written with exclusive create; if a
write fails, what this command wrote (files, then the folders it made) is removed again.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import click

from microagent.commands.context import Ctx, pass_ctx
from microagent.errors import (
    ConflictError,
    HostIOError,
    InvalidInputError,
    MicroagentError,
    UsageError,
)
from microagent.frozen import Frozen

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # the spec schema's `name`
NAME_HINT = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 63"
FALLBACK_NAME = "agent"


@dataclass(frozen=True, eq=False, repr=False)
class Provider(Frozen):
    """What differs between the three example agents."""

    name: str  # the credential preset (docs/broker.md)
    package: str  # the SDK on PyPI
    requirement: str  # as the setup step installs it
    key_env: str  # the host variable the broker reads at each start
    model: str  # who the agent talks to, in words
    example: str  # the example folder in the sources

    def to_template(self) -> dict[str, str]:
        return {
            "name": self.name,
            "package": self.package,
            "sdk": self.requirement,
            "key_env": self.key_env,
            "model": self.model,
            "example": f"examples/{self.example}",
        }


PROVIDERS = {
    p.name: p
    for p in (
        Provider(
            "anthropic",
            "anthropic",
            "anthropic>=0.40",
            "ANTHROPIC_API_KEY",
            "Claude (the Anthropic Messages API)",
            "minimal-agent",
        ),
        Provider(
            "openai",
            "openai",
            "openai>=1.50",
            "OPENAI_API_KEY",
            "OpenAI Chat Completions",
            "minimal-agent-openai",
        ),
        Provider(
            "gemini",
            "google-genai",
            "google-genai>=0.3",
            "GEMINI_API_KEY",
            "Google Gemini (the google-genai SDK)",
            "minimal-agent-gemini",
        ),
    )
}

# (template under templates/init, file written under DIR), in the order written; the agent
# itself comes from templates/init/agents/<provider>.py.j2.
COMMON_FILES = (
    ("microagent.yaml.j2", "microagent.yaml"),
    ("protocol.py.j2", "protocol.py"),
    ("demo/constraints.json", "demo/constraints.json"),
    ("demo/system_prompt.md", "demo/system_prompt.md"),
    ("demo/input-001.json", "demo/input-001.json"),
    ("demo/input-002.json", "demo/input-002.json"),
    ("README.md.j2", "README.md"),
)


def project_files(provider: str) -> tuple[tuple[str, str], ...]:
    """Every (template, file written) of a project for ``provider``."""
    spec, *rest = COMMON_FILES
    return (spec, (f"agents/{provider}.py.j2", "agent.py"), *rest)


def _yaml_scalar(value: str) -> str:
    """``value`` as a YAML string: bare when YAML reads it back as that string, else quoted
    (a name such as ``123``, ``true`` or ``1e3`` is a number or a boolean bare)."""
    import yaml  # deferred: only init renders YAML; the CLI starts without it

    return value if yaml.safe_load(value) == value else json.dumps(value)


def render_project(name: str, provider: Provider) -> dict[str, bytes]:
    """The project's files (path under DIR → content) for ``name`` and ``provider``."""
    import jinja2  # deferred: only init renders templates; the CLI starts without jinja2

    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )
    env.filters["yaml_scalar"] = _yaml_scalar
    root = resources.files("microagent").joinpath("templates", "init")
    values: dict[str, Any] = {"name": name, "provider": provider.to_template()}
    files: dict[str, bytes] = {}
    for template, path in project_files(provider.name):
        source = root.joinpath(*template.split("/"))
        if not template.endswith(".j2"):
            files[path] = source.read_bytes()
            continue
        try:
            text = env.from_string(source.read_text(encoding="utf-8")).render(values)
        except jinja2.TemplateError as exc:
            raise MicroagentError(f"cannot render the init template {template}: {exc}") from exc
        files[path] = text.encode()
    return files


def default_name(directory: Path) -> str:
    """A workspace name from the folder's name (``My Agent`` → ``My-Agent``), or ``agent``."""
    raw = re.sub(r"[^A-Za-z0-9._-]+", "-", directory.resolve().name)
    raw = re.sub(r"^[^A-Za-z0-9]+", "", raw)[:63].rstrip(".-_")
    return raw if NAME_RE.fullmatch(raw) else FALLBACK_NAME


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise UsageError(f"invalid --name {name!r}", hint=NAME_HINT)
    return name


def check_directory(directory: Path) -> None:
    """DIR is a folder we may write in, or does not exist yet (its nearest existing parent is
    a folder we may write in)."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # a dangling link: never written through
            raise InvalidInputError(f"{existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        what = "DIR" if existing == directory else "a parent of DIR"
        raise InvalidInputError(
            f"{existing} is not a directory ({what})",
            hint="give a folder (new or existing) to hold the project",
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise HostIOError(
            f"cannot write in {existing}: permission denied", hint="pick a folder you own"
        )


def clashes(directory: Path, paths: list[str]) -> list[str]:
    """The paths (under DIR) that exist already, or that something not a folder stands in the
    way of (a file named ``demo``); a dangling symlink counts as existing."""
    found: list[str] = []
    for rel in paths:
        parts = rel.split("/")
        for depth in range(1, len(parts) + 1):
            target = directory.joinpath(*parts[:depth])
            taken = target.exists() or target.is_symlink()
            if taken and (depth == len(parts) or not target.is_dir()):
                clash = "/".join(parts[:depth])
                if clash not in found:
                    found.append(clash)
                break
    return found


def write_project(directory: Path, files: Mapping[str, bytes]) -> None:
    """Write every file under ``directory`` (made if missing), never over an existing one; on
    any failure remove what was written here and the folders made, then raise."""
    clash = clashes(directory, list(files))
    if clash:
        raise ConflictError(
            f"{len(clash)} of the files init writes already exist in {directory}: "
            + ", ".join(clash),
            hint="nothing was written; init into a new or empty folder: microagent init DIR",
        )
    made: list[Path] = []
    written: list[Path] = []
    path = directory
    try:
        _make_dirs(directory, made)
        for rel, data in files.items():
            path = directory.joinpath(*rel.split("/"))
            _make_dirs(path.parent, made)
            with path.open("xb") as out:  # exclusive: never over a file made meanwhile
                written.append(path)
                out.write(data)
    except OSError as exc:
        for done in reversed(written):
            done.unlink(missing_ok=True)
        for folder in reversed(made):
            folder.rmdir()
        raise HostIOError(
            f"cannot write {exc.filename or path}: {exc.strerror or exc}",
            hint="nothing was left behind; fix the cause and run init again",
        ) from exc


def _make_dirs(folder: Path, made: list[Path]) -> None:
    """``mkdir -p``, recording each folder it made (outermost first)."""
    missing: list[Path] = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
        made.append(path)


def next_steps(directory: Path, name: str, provider: Provider) -> list[str]:
    """The commands to run next, with paths as the user gave DIR."""
    here = directory == Path()

    def at(rel: str) -> str:
        return shlex.quote(rel if here else str(directory / rel))

    return [
        f"microagent create -f {at('microagent.yaml')}",
        f"export {provider.key_env}=...   # read on the host at each start; never in the guest",
        f"microagent cp {at('demo/input-001.json')} {name}:/workspace/input.json",
        f"microagent start {name} --wait",
        f"microagent result {name}",
    ]


@click.command()
@click.argument(
    "directory", metavar="[DIR]", default=".", type=click.Path(path_type=Path, dir_okay=True)
)
@click.option(
    "--provider",
    type=click.Choice(sorted(PROVIDERS)),
    default="anthropic",
    show_default=True,
    help="The model API the agent talks to (its credential preset).",
)
@click.option("--name", help="The workspace name in the spec (default: from DIR's name).")
@pass_ctx
def init(ctx: Ctx, /, directory: Path, provider: str, name: str | None) -> None:
    """Scaffold a working agent project in DIR (default: here): spec, agent, demo input.

    Writes microagent.yaml, agent.py, protocol.py, README.md and demo/; refuses to overwrite
    any file (nothing is written then)."""
    chosen = PROVIDERS[provider]
    name = check_name(name) if name is not None else default_name(directory)
    check_directory(directory)
    files = render_project(name, chosen)
    write_project(directory, files)
    steps = next_steps(directory, name, chosen)
    data = {
        "ok": True,
        "directory": str(directory.resolve()),
        "name": name,
        "provider": provider,
        "files": sorted(files),
        "next": steps,
    }
    tops = dict.fromkeys(p.split("/")[0] + ("/" if "/" in p else "") for p in files)
    text = f"created {name} ({provider}) in {directory}: {', '.join(tops)}\nnext:\n"
    ctx.emit(data, text + "\n".join(f"  {s}" for s in steps))


COMMANDS = [init]
