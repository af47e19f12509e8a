"""`--vm-type uml`: the build machine is a User-mode Linux kernel, one host process.

obs-build's command line (`build-vm-uml`), with what it needs today:

    linux.uml ubda=ROOT ubdb=SWAP root=/dev/ubda rootfstype=FS rootflags=OPTS rw mem=<N>M
              con=null con0=null,fd:1 initrd=INITRAMFS panic=1 quiet cloudbuild.swap=/dev/ubdb

- the memory needs its unit (`mem=512` alone is refused by the UML kernel);
- the console goes to the process' stdout (`con0=null,fd:1`), which we stream into the build log;
- the initrd is the agent's initramfs (`agentroot.agent_initramfs()`: busybox, python3, the
  agent, no modules: ubd, ext4, xfs, btrfs, reiserfs and devtmpfs are built into Debian's UML
  kernel), so the guest runs the same agent as qemu; `--vm-initrd` replaces it;
- the kernel is `--vm-kernel`, else `linux.uml` on PATH (Debian's user-mode-linux), else
  obs-build's /boot/vmlinux-um;
- kill: our process, else every process holding the root image (`fuser -k -TERM`, as obs-build).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from cloudbuild.backend import BootResult, BuildSlot, Console, register
from cloudbuild.disk.mkfs import mount_options
from cloudbuild.errors import HostBroken, UsageError
from cloudbuild.log import get_logger
from cloudbuild.options import VmOptions
from cloudbuild.runner import which
from cloudbuild.volume import VolumePair
from local_backends import agentroot
from local_backends.localvolume import image_path, local_volumes
from local_backends.machines.vmproc import ProcessMachineBackend

log = get_logger(__name__)

GUEST_ROOT = "/dev/ubda"
GUEST_SWAP = "/dev/ubdb"
DEFAULT_MEMORY_MIB = 512
OBS_KERNEL = Path("/boot/vmlinux-um")


def uml_kernel(options: VmOptions) -> Path:
    if options.vm_kernel:
        return Path(options.vm_kernel)
    found = which("linux.uml") or which("linux")
    if found is not None:
        return found
    if OBS_KERNEL.exists():
        return OBS_KERNEL
    raise HostBroken("no UML kernel: install user-mode-linux (linux.uml) or pass --vm-kernel")


def ubd_path(path: Path) -> str:
    text = str(path)
    if any(c in text for c in ", \t\n="):
        raise UsageError(
            f"uml: the disk path {text!r} has a comma, '=' or white space, which ubd cannot take"
        )
    return text


def uml_argv(
    *,
    kernel: Path,
    root: Path,
    swap: Path | None,
    initrd: Path,
    memory_mib: int,
    fstype: str,
    root_options: str,
) -> list[str]:
    argv = [str(kernel), f"ubda={ubd_path(root)}"]
    if swap is not None:
        argv.append(f"ubdb={ubd_path(swap)}")
    argv += [f"root={GUEST_ROOT}", f"rootfstype={fstype}"]
    if root_options:
        argv.append(f"rootflags={root_options}")
    argv += [
        "rw",
        f"mem={memory_mib}M",
        "con=null",
        "con0=null,fd:1",
        f"initrd={ubd_path(initrd)}",
        "panic=1",
        "quiet",
    ]
    if swap is not None:
        argv.append(f"cloudbuild.swap={GUEST_SWAP}")
    return argv


@register
class UmlBackend(ProcessMachineBackend):
    name: ClassVar[str] = "uml"
    guest_swap_device: ClassVar[str | None] = GUEST_SWAP

    def __init__(self, options: VmOptions):
        super().__init__(options)
        self._initrd: Path | None = None

    def verify(self) -> None:
        kernel = uml_kernel(self.options)
        if not kernel.is_file():
            raise UsageError(f"--vm-kernel {kernel}: no such file")
        if self.options.vm_initrd and not Path(self.options.vm_initrd).is_file():
            raise UsageError(f"--vm-initrd {self.options.vm_initrd}: no such file")
        if self.options.vm_memory is not None and self.options.vm_memory < 64:
            raise UsageError(
                f"--vm-memory {self.options.vm_memory}: a UML build machine needs 64 MiB at least"
            )
        self._initrd = Path(self.options.vm_initrd) if self.options.vm_initrd else agentroot.agent_initramfs()

    def volumes(self, slot: BuildSlot) -> VolumePair:
        self.workdir = slot.workdir
        self.pair = local_volumes(self.options, slot.workdir)
        return self.pair

    def argv(self, pair: VolumePair) -> list[str]:
        options = self.options
        initrd = self._initrd or (
            Path(options.vm_initrd) if options.vm_initrd else agentroot.agent_initramfs()
        )
        return uml_argv(
            kernel=uml_kernel(options),
            root=image_path(pair.root, "uml"),
            swap=image_path(pair.swap, "uml") if pair.swap is not None else None,
            initrd=initrd,
            memory_mib=options.vm_memory or DEFAULT_MEMORY_MIB,
            fstype=options.filesystem,
            root_options=mount_options(options.filesystem, options.mount_options),
        )

    def boot_and_wait(
        self, pair: VolumePair, slot: BuildSlot, *, timeout: float | None, console: Console
    ) -> BootResult:
        return self.boot_process(self.argv(pair), pair, slot, console, timeout=timeout, name="uml")
