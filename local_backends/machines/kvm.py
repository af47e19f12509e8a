"""`--vm-type kvm`: the qemu machine with hardware acceleration.

Before anything is created, the host is checked for a KVM that can actually run a guest:
`/dev/kvm` must exist and be usable, the CPU must offer vmx/svm, and the module behind
/dev/kvm must not be `kvm_pvm` (a paravirtualised KVM some cloud VMs expose without
hardware virtualisation: guests abort or hang there). An unusable KVM is a property of the
host, not of the build: exit 4 ("host broken"), with the fix in the message: `--vm-type qemu`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from cloudbuild.backend import register
from cloudbuild.errors import HostBroken
from local_backends.machines.qemu import QemuBackend

DEV_KVM = Path("/dev/kvm")
HINT = "use --vm-type qemu (no acceleration, slower)"


def kvm_problem(
    *,
    dev: Path = DEV_KVM,
    sys_module: Path = Path("/sys/module"),
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> str | None:
    """Why this host cannot run KVM guests, or None when it can."""
    if not dev.exists():
        return f"{dev} does not exist (no kvm module loaded, or no hardware virtualisation)"
    if (sys_module / "kvm_pvm").exists():
        return f"{dev} is kvm_pvm (paravirtualised KVM, no hardware virtualisation)"
    try:
        flags = {
            word
            for line in cpuinfo.read_text(errors="replace").splitlines()
            if line.startswith("flags")
            for word in line.split(":", 1)[1].split()
        }
    except OSError:
        flags = set()
    if flags and not flags & {"vmx", "svm"}:
        return "the CPU offers no hardware virtualisation (no vmx/svm in /proc/cpuinfo)"
    if not os.access(dev, os.R_OK | os.W_OK):
        return f"{dev} is not readable and writable by this user (add it to the kvm group)"
    return None


@register
class KvmBackend(QemuBackend):
    name: ClassVar[str] = "kvm"
    accel: ClassVar[str] = "kvm"

    def verify(self) -> None:
        problem = kvm_problem()
        if problem:
            raise HostBroken(f"--vm-type kvm: {problem}; {HINT}")
        super().verify()
