"""``run``: one command in a fresh microVM, from an image or an ext4 root filesystem."""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import click

from microagent.commands.context import (
    Ctx,
    credential_option,
    credential_upstream_option,
    pass_ctx,
    publish_option,
    seconds_option,
    stream_to_stdout,
    warn_key_env,
)
from microagent.errors import UsageError, VMError

RAW_ARGS = "microagent.run.args"  # ctx.meta: the command line as given, before click parses it


class _RunCommand(click.Command):
    """Keeps the raw arguments: only they tell whether ``--`` came before the guest command
    (click drops a ``--`` that precedes every positional word)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta[RAW_ARGS] = tuple(args)
        return super().parse_args(ctx, args)


@click.command(cls=_RunCommand, context_settings={"allow_interspersed_args": False})
@click.option(
    "--rootfs",
    type=click.Path(path_type=Path),
    help="Boot this root file system image (ext4) instead of an image reference.",
)
@click.option(
    "--layer",
    "layers",
    multiple=True,
    type=click.Path(path_type=Path),
    metavar="IMAGE",
    help="With --rootfs: stack this read-only ext4 layer image over it (repeatable, bottom "
    "first; overlayfs form: a whiteout is a character device 0/0, an opaque directory has "
    "trusted.overlay.opaque=y).",
)
@click.option(
    "--network",
    type=click.Choice(["user", "isolated"]),
    default="user",
    show_default=True,
    help="user: outbound NAT, host unreachable; isolated: no NIC.",
)
@click.option(
    "--env",
    "-e",
    "env",
    multiple=True,
    help="Variable NAME=VALUE (or NAME from this shell) for the command.",
)
@credential_option("a preset (anthropic, openai, gemini)")
@credential_upstream_option
@click.option(
    "--audit-log",
    "audit_log",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append the run's broker audit entries (JSON lines) to FILE (needs --credential).",
)
@seconds_option("Stop the VM after this many seconds (more than 0).")
@click.option(
    "--memory",
    "memory_mib",
    type=int,
    default=1024,
    show_default=True,
    help="Guest memory in MiB (64 to 1048576).",
)
@click.option("--cpus", type=int, help="vCPUs, 1 to 64 (default: 1 under TCG, 2 under KVM).")
@click.option(
    "--host-forward",
    "host_forward",
    multiple=True,
    metavar="GUEST=HOST",
    help="Let the guest reach host 127.0.0.1:HOST (or a unix socket path) at 10.0.2.100:GUEST.",
)
@click.option("--forward", "forward", multiple=True, hidden=True)  # old spelling: GUEST:HOST
@publish_option
@click.option(
    "--trust-host-ca",
    is_flag=True,
    help="Add this host's CA bundle to the guest's trusted certificates.",
)
@click.option(
    "--ca-bundle",
    type=click.Path(path_type=Path),
    help="Add the certificates in this PEM file to the guest's trusted set.",
)
@click.option("--workdir", default="/", show_default=True, help="Guest working directory.")
@click.option("--kernel", type=click.Path(path_type=Path), help="Boot this kernel instead.")
@click.option("--initrd", type=click.Path(path_type=Path), help="Boot this initramfs instead.")
@click.option(
    "--machine",
    type=click.Choice(["microvm", "q35"]),
    default="microvm",
    show_default=True,
    help="QEMU machine model.",
)
@click.option(
    "--accel",
    type=click.Choice(["auto", "kvm", "tcg"]),
    help="auto: KVM if a test boot works, else TCG (default: $MICROAGENT_ACCEL or auto).",
)
@click.option("--print-command", is_flag=True, help="Print the VMM command line and exit.")
@click.argument("command", nargs=-1, required=True)
@pass_ctx
def run(ctx: Ctx, /, command: tuple[str, ...], **opts: Any) -> None:
    """Run a command in a fresh microVM: `run IMAGE -- CMD...` or `run --rootfs FILE -- CMD...`.

    IMAGE is pulled (or reused from the cache) like a spec's base image; FILE must be an ext4
    image, and --layer stacks read-only ext4 layers over it (the top one given last), as
    overlayfs lowers in the guest. Options go before IMAGE; a word after it that starts with
    `-` needs the `--` separator. The guest command's exit code is the exit code.

    Writes go to a throwaway state disk; the image itself is never modified. On a terminal the
    output streams live (stdout and stderr interleaved, from the serial console); otherwise
    the captured stdout and stderr (last 64 KiB each) go to the matching streams at the end.

    With --credential, a broker on the host holds the API key while the command runs: the
    guest gets the broker's address in the preset's base-URL variable (ANTHROPIC_BASE_URL,
    OPENAI_BASE_URL, GOOGLE_GEMINI_BASE_URL) and a placeholder in its key variable, never the
    key.
    """
    stream = not ctx.json and sys.stdout.isatty()
    api = ctx.api(output=stream_to_stdout if stream else None)
    raw = click.get_current_context().meta.get(RAW_ARGS, ())
    job = _job(command, opts, raw)
    warn_key_env(job.env)
    if opts["print_command"]:
        argv = api.run_command(job)
        ctx.emit({"ok": True, "argv": argv}, shlex.join(argv))
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)  # clean up the VM and netns on TERM
    try:
        result = api.run(job)
    finally:
        signal.signal(signal.SIGTERM, previous)
    _report(ctx, result, streamed=stream)
    raise click.exceptions.Exit(result.exit_code)


def _split(words: tuple[str, ...], raw: tuple[str, ...], rootfs: bool) -> tuple[Any, Any]:
    """IMAGE and the guest command (``IMAGE [--] CMD...``; only CMD with --rootfs). Without
    a ``--`` before the command, a word that looks like an option is refused: it was meant
    for microagent (``run IMAGE echo hi --print-command`` must not boot)."""
    image, command = None, words
    if not rootfs:
        image, command = (words[0] if words else None), words[1:]
        if command[:1] == ("--",):
            return image, command[1:]
    separated = 0 < len(words) < len(raw) and raw[-len(words) - 1] == "--"
    option = next((w for w in command if w.startswith("-") and w != "-"), None)
    if option is not None and not separated:
        where = f"after the image {image!r}" if image is not None else "in the command"
        shown = shlex.join(command)
        shown = shown if len(shown) <= 60 else shown[:59] + "…"
        before = f"{image} " if image is not None else ""
        raise UsageError(
            f"{option!r} {where} looks like an option: microagent's options go before "
            f"{'IMAGE' if image is not None else 'the command'}, the guest command after `--`",
            hint=f"use -- before the command: microagent run [OPTIONS] {before}-- {shown}",
        )
    return image, command


def _job(words: tuple[str, ...], opts: dict[str, Any], raw: tuple[str, ...] = ()) -> Any:
    """The one-shot run the flags describe (``IMAGE [--] CMD...`` without --rootfs)."""
    # deferred: the library stays off the path of --help and usage errors
    from microagent.compiler.overrides import credentials_with_flags, parse_env, parse_publishes
    from microagent.runtime.backend import Accel, Forward, MachineType, NetworkConfig
    from microagent.runtime.configdisk import NetworkMode
    from microagent.workspace.records import published_ports
    from microagent.workspace.run import OneShot

    image, command = _split(words, raw, opts["rootfs"] is not None)
    forwards = [Forward.parse(f) for f in opts["host_forward"]]
    forwards += [Forward.parse(f, flag="--forward", sep=":") for f in opts["forward"]]
    published = published_ports(parse_publishes(opts["publish"]))
    mode = NetworkMode.parse(opts["network"])
    creds = credentials_with_flags(
        (), opts["credentials"], opts["credential_upstreams"], spec=False
    )
    return OneShot(
        command=command,
        image=image,
        rootfs=opts["rootfs"],
        env=dict(parse_env(opts["env"]).values),
        network=NetworkConfig(mode, tuple(forwards), published),
        timeout=opts["timeout"],
        memory_mib=opts["memory_mib"],
        cpus=opts["cpus"],
        workdir=opts["workdir"],
        extra_ca=_extra_ca(opts["trust_host_ca"], opts["ca_bundle"]),
        machine=MachineType(opts["machine"]),
        accel=Accel.parse(opts["accel"]) if opts["accel"] else None,
        kernel=opts["kernel"],
        initrd=opts["initrd"],
        credentials=creds,
        audit_log=opts["audit_log"],
        layers=tuple(opts["layers"]),
    )


def _extra_ca(trust_host_ca: bool, ca_bundle: Path | None) -> bytes | None:
    """Flags win; None leaves it to the settings ($MICROAGENT_EXTRA_CA or guest.extraCA)."""
    from microagent.settings import read_ca_bundle  # deferred: see context.Ctx.settings

    parts = []
    if trust_host_ca:
        parts.append(read_ca_bundle())
    if ca_bundle is not None:
        parts.append(read_ca_bundle(ca_bundle))
    return b"\n".join(parts) if parts else None


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _report(ctx: Ctx, result: Any, *, streamed: bool) -> None:
    if ctx.json:
        data = {"ok": result.error is None, "backend": ctx.settings.backend}
        error = VMError(f"run: {result.error}") if result.error else None
        ctx.emit({**data, "result": result.to_json()}, "", error=error)
        return
    if not streamed:
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.write(result.stderr)
    if result.stdout_truncated or result.stderr_truncated:
        ctx.say("microagent: output was longer than the captured tail (see the serial log)")
    if result.error:
        ctx.say(f"microagent: {result.error}")


COMMANDS = [run]
