"""Commands that boot or prepare microVMs: run, doctor, kernel ls|install."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click

from microagent.commands.context import Ctx, pass_ctx


def _store(ctx: Ctx) -> Any:
    from microagent.settings import home_dir, store_dir
    from microagent.store.content import Store

    return Store(store_dir(home_dir(ctx.home)))


def _say(message: str) -> None:
    click.echo(message, err=True)


def _parse_forward(text: str) -> Any:
    from microagent.errors import InvalidInputError
    from microagent.runtime.backend import Forward

    guest, sep, target = text.partition(":")
    if not sep or not guest.isdigit():
        raise InvalidInputError(
            f"--forward {text!r}: expected GUESTPORT:HOSTPORT or GUESTPORT:/path/to.sock"
        )
    if target.isdigit():
        return Forward(int(guest), host_port=int(target))
    return Forward(int(guest), unix_socket=Path(target).resolve())


def _extra_ca(trust_host_ca: bool, ca_bundle: Path | None) -> bytes | None:
    """Flags win; else the user's setting ($MICROAGENT_EXTRA_CA or guest.extraCA)."""
    from microagent.runtime.oneshot import host_ca_bundle
    from microagent.settings import extra_ca_bundle

    parts = []
    if trust_host_ca:
        parts.append(host_ca_bundle())
    if ca_bundle is not None:
        parts.append(host_ca_bundle(ca_bundle))
    return b"\n".join(parts) if parts else extra_ca_bundle()


@click.command(context_settings={"allow_interspersed_args": False})
@click.option(
    "--rootfs",
    type=click.Path(path_type=Path),
    help="Boot this root file system image (ext4) instead of an image reference.",
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
@click.option("--timeout", type=float, help="Stop the VM after this many seconds.")
@click.option(
    "--memory", "memory_mib", type=int, default=1024, show_default=True, help="Guest memory in MiB."
)
@click.option("--cpus", type=int, default=0, help="vCPUs (default: 1 under TCG, 2 under KVM).")
@click.option(
    "--forward",
    "forwards",
    multiple=True,
    metavar="GUEST:HOST",
    help="Let the guest reach host 127.0.0.1:HOST (or a unix socket) at 10.0.2.100:GUEST.",
)
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
    default="auto",
    show_default=True,
    help="auto: KVM if a test boot works, else TCG.",
)
@click.option("--print-command", is_flag=True, help="Print the VMM command line and exit.")
@click.argument("command", nargs=-1, required=True)
@pass_ctx
def run(ctx: Ctx, /, command: tuple[str, ...], **opts: Any) -> None:
    """Run a command in a fresh microVM: `run IMAGE -- CMD...` or `run --rootfs FILE -- CMD...`.

    IMAGE is pulled (or reused from the cache) like a spec's base image. The guest command's exit
    code is the exit code.

    Writes go to a throwaway state disk; the image itself is never modified. On a terminal the
    output streams live (stdout and stderr interleaved, from the serial console); otherwise
    the captured stdout and stderr (last 64 KiB each) go to the matching streams at the end.
    """
    from microagent.kit.guestkit import resolve_kit
    from microagent.runtime import oneshot
    from microagent.runtime.qemu import QemuBackend

    store = _store(ctx)
    if opts["rootfs"] is None:
        opts["rootfs"], command = _image_rootfs(store, command, quiet=ctx.json)
    request = _request(command, opts)
    kit = resolve_kit(store, kernel=opts["kernel"], initrd=opts["initrd"], progress=_say)
    backend = QemuBackend(cache_dir=store.root / "probes")
    if opts["print_command"]:
        import shlex

        argv = oneshot.print_command(request, backend=backend, kit=kit)
        ctx.emit({"ok": True, "argv": argv}, shlex.join(argv))
        return
    stream = not ctx.json and sys.stdout.isatty()
    previous = signal.signal(signal.SIGTERM, _interrupt)  # clean up the VM and netns on TERM
    try:
        sink = _echo if stream else None
        result = oneshot.run_once(request, backend=backend, kit=kit, on_output=sink)
    finally:
        signal.signal(signal.SIGTERM, previous)
    _report(ctx, result, streamed=stream)
    raise click.exceptions.Exit(result.exit_code)


def _image_rootfs(
    store: Any, words: tuple[str, ...], *, quiet: bool
) -> tuple[Path, tuple[str, ...]]:
    """``IMAGE CMD...``: pull IMAGE (or reuse the cached base) and boot its rootfs."""
    from microagent.build.base import pull_base
    from microagent.errors import InvalidInputError

    rest = words[2:] if words[1:2] == ("--",) else words[1:]
    if not words or not rest:
        raise InvalidInputError(
            "give an image and a command, or --rootfs FILE and a command",
            hint="e.g. microagent run python:3.13-slim -- python3 -c 'print(6*7)'",
        )
    base = pull_base(store, words[0], base_dir=Path.cwd(), progress=None if quiet else _say)
    return base.rootfs, rest


def _request(command: tuple[str, ...], opts: dict[str, Any]) -> Any:
    from microagent.compiler.overrides import parse_env
    from microagent.runtime.backend import Accel, MachineType, NetworkConfig
    from microagent.runtime.configdisk import NetworkMode
    from microagent.runtime.oneshot import RunRequest

    return RunRequest(
        rootfs=opts["rootfs"],
        command=command,
        env=dict(parse_env(opts["env"]).values),
        network=NetworkConfig(
            NetworkMode.parse(opts["network"]),
            tuple(_parse_forward(f) for f in opts["forwards"]),
        ),
        timeout=opts["timeout"],
        memory_mib=opts["memory_mib"],
        cpus=opts["cpus"],
        workdir=opts["workdir"],
        extra_ca=_extra_ca(opts["trust_host_ca"], opts["ca_bundle"]),
        machine=MachineType(opts["machine"]),
        accel=Accel(opts["accel"]),
    )


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _echo(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _report(ctx: Ctx, result: Any, *, streamed: bool) -> None:
    if ctx.json:
        ctx.emit({"ok": result.error is None, "backend": "qemu", "result": result.to_json()}, "")
        return
    if not streamed:
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.write(result.stderr)
    if result.stdout_truncated or result.stderr_truncated:
        _say("microagent: output was longer than the captured tail (see the serial log)")
    if result.error:
        _say(f"microagent: {result.error}")


@click.command()
@pass_ctx
def doctor(ctx: Ctx) -> None:
    """Check this host: QEMU, KVM/TCG, networking tools, the guest kit, the store."""
    from microagent.workspace.doctor import diagnose

    report = diagnose(_store(ctx))
    ctx.emit(report.to_json(), report.render())
    if report.verdict == "failed":
        raise click.exceptions.Exit(1)


@click.group()
def kernel() -> None:
    """Guest kits: the kernel and initramfs microVMs boot."""


@kernel.command("ls")
@pass_ctx
def kernel_ls(ctx: Ctx) -> None:
    """List the guest kits in the store (newest first)."""
    from microagent.kit.guestkit import list_kits

    kits = list_kits(_store(ctx))
    lines = [
        f"{k.key[:12]}  {k.kernel_version:<24} {'current' if k.to_json()['current'] else 'old'}"
        f"  {k.manifest.get('installedAt', '')}"
        for k in kits
    ]
    ctx.emit({"ok": True, "kits": [k.to_json() for k in kits]}, "\n".join(lines) or "no kits")


@kernel.command("install")
@click.option(
    "--mirror", help="Debian mirror URL (default: $MICROAGENT_DEBIAN_MIRROR or deb.debian.org)."
)
@click.option("--suite", help="Debian suite (default: bookworm).")
@pass_ctx
def kernel_install(ctx: Ctx, mirror: str | None, suite: str | None) -> None:
    """Download the newest Debian cloud kernel and busybox and build a guest kit."""
    from microagent.kit.debian import Mirror
    from microagent.kit.guestkit import install_kit

    kit = install_kit(_store(ctx), Mirror.from_env(mirror, suite), progress=_say)
    ctx.emit(
        {"ok": True, "kit": kit.to_json()},
        f"{kit.key[:12]}  {kit.kernel_version}  {kit.kernel.parent}",
    )


@kernel.command("prune")
@pass_ctx
def kernel_prune(ctx: Ctx) -> None:
    """Remove guest kits built by an older microagent (the current ones stay)."""
    from microagent.kit.guestkit import prune_kits

    gone = prune_kits(_store(ctx))
    lines = [f"removed {k.key[:12]}  {k.kernel_version}" for k in gone] or ["nothing to remove"]
    ctx.emit({"ok": True, "removed": [k.key for k in gone]}, "\n".join(lines))


COMMANDS = [run, doctor, kernel]
