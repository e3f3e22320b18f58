"""The machine's enums: the QEMU machine model and the accelerator.

Apart from :mod:`microagent.runtime.backend` (which names them too) so that code needing only
these (settings checks, the build pipeline's accelerator choice) does not load the backend
interface and its dataclasses.
"""

from __future__ import annotations

import enum

from microagent.errors import InvalidInputError


class MachineType(enum.Enum):
    """QEMU machine model: ``microvm`` (virtio-mmio, fastest) or ``q35`` (PCI, fallback)."""

    MICROVM = "microvm"
    Q35 = "q35"

    @property
    def transport(self) -> str:
        """What the guest init loads: ``mmio`` or ``pci`` virtio transport modules."""
        return "mmio" if self is MachineType.MICROVM else "pci"


class Accel(enum.Enum):
    """Accelerator choice; ``auto`` means KVM only when a real boot probe succeeded."""

    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"

    @classmethod
    def parse(cls, value: str) -> Accel:
        """An accelerator from a flag or ``MICROAGENT_ACCEL``, or a clear error."""
        try:
            return cls(value.strip().lower())
        except ValueError:
            raise InvalidInputError(
                f"{value!r} is not an accelerator",
                hint="use auto, kvm or tcg (--accel or MICROAGENT_ACCEL)",
            ) from None
