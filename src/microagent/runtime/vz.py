"""Seam for a macOS Virtualization.framework backend. Not implemented yet.

It would boot the arm64 kit kernel with virtio block devices in the same order and a
virtio-vsock control channel; networking through the framework's NAT attachment.
"""

from __future__ import annotations

from collections.abc import Sequence

from microagent.errors import VMError
from microagent.runtime.backend import Availability, BootConfig, Machine


class VzBackend:
    """Reports honestly that it cannot run; never pretends to boot."""

    name = "vz"

    def available(self) -> Availability:
        return Availability(
            False, "the Virtualization.framework backend is not implemented on this host"
        )

    def command(self, config: BootConfig) -> Sequence[str]:
        raise VMError("the vz backend is not implemented", hint="use the qemu backend")

    def boot(self, config: BootConfig) -> Machine:
        raise VMError("the vz backend is not implemented", hint="use the qemu backend")
