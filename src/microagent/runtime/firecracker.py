"""Seam for a Firecracker backend (Linux with working KVM). Not implemented yet.

It would boot the same kit kernel (an uncompressed ``vmlinux``) and initramfs with the same
disk order, use vsock for the control channel and a tap device in the VM's network namespace.
"""

from __future__ import annotations

from collections.abc import Sequence

from microagent.errors import VMError
from microagent.runtime.backend import Availability, BootConfig, Machine


class FirecrackerBackend:
    """Reports honestly that it cannot run; never pretends to boot."""

    name = "firecracker"

    def available(self) -> Availability:
        return Availability(False, "the Firecracker backend is not implemented on this host")

    def command(self, config: BootConfig) -> Sequence[str]:
        raise VMError("the Firecracker backend is not implemented", hint="use the qemu backend")

    def boot(self, config: BootConfig) -> Machine:
        raise VMError("the Firecracker backend is not implemented", hint="use the qemu backend")
