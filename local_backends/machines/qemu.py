"""`--vm-type qemu`: the build machine is a qemu process (TCG, no hardware virtualisation needed).

kvm is the same machine with acceleration (`local_backends/machines/kvm.py` subclasses this), as in
obs-build where build-vm-qemu reuses build-vm-kvm. The command line is obs-build's kvm one:
`-no-reboot -nographic -nodefaults`, no network, the root and swap as virtio-blk drives with
`serial=0`/`serial=1` and `cache=unsafe` (a build disk is thrown away if the host crashes),
`-smp` from `--jobs`, `-m` from `--vm-memory`, `-mem-path` for `--hugetlbfs`, the console on
the first serial port (stdout of the process), streamed live into the build log.

Kernel and initrd: `--vm-kernel`/`--vm-initrd`; else the ones the build root ships
(`.build.kernel.qemu`, `.build.initrd.qemu`, copied out by `kernel_files()` before the root is
unmounted, with the modules our initramfs needs from the build root's /lib/modules when the host
has none for that kernel); else the host's newest kernel. Without an initrd, cloudbuild builds its own from
the kernel's modules (`local_backends/initramfs.py`): it starts the guest agent. A given
`--vm-initrd` gets the agent's initramfs appended (`agentroot.with_agent`): our /init starts the
agent after loading the disk drivers with the given initrd's own modules and modprobe.

`QemuMachine` is usable on its own (any root/swap image paths), e.g. to play a cloud builder.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cloudbuild.backend import BootResult, BuildSlot, Console, register
from cloudbuild.disk.mkfs import mount_options
from cloudbuild.errors import HostBroken, UsageError
from cloudbuild.log import get_logger
from cloudbuild.options import VmOptions
from cloudbuild.runner import which
from cloudbuild.volume import VolumePair
from local_backends import agentroot, initramfs, kmod
from local_backends.kernel import bootable_kernel, host_kernel, kernel_release
from local_backends.localvolume import image_path, local_volumes
from local_backends.machines.vmproc import ProcessMachineBackend

log = get_logger(__name__)

GUEST_ROOT = "/dev/disk/by-id/virtio-0"
GUEST_SWAP = "/dev/disk/by-id/virtio-1"
DEFAULT_MEMORY_MIB = 1024
PER_LINUX32 = 0x0008
QBOOT = "/usr/share/qemu/qboot.rom"  # Debian's qemu-system-data

# host machine -> (qemu binary, machine, console device)
_ARCHES: dict[str, tuple[str, str, str]] = {
    "x86_64": ("qemu-system-x86_64", "pc", "ttyS0"),
    "aarch64": ("qemu-system-aarch64", "virt", "ttyAMA0"),  # untested here
}


def host_arch() -> tuple[str, str, str]:
    machine = platform.machine()
    if machine in ("i386", "i486", "i586", "i686"):
        machine = "x86_64"  # a 64-bit kernel under linux32 personality reports i686
    try:
        return _ARCHES[machine]
    except KeyError:
        raise HostBroken(
            f"--vm-type qemu: no qemu machine definition for host architecture {machine}"
        ) from None


def _personality_prefix() -> list[str]:
    """obs-build starts kvm through `linux64` so that a linux32 worker still runs a 64-bit qemu."""
    try:
        value = int(Path("/proc/self/personality").read_text().strip(), 16)
    except (OSError, ValueError):
        return []
    if value & 0xFF == PER_LINUX32 and which("setarch"):
        return ["setarch", "x86_64"]
    return []


def check_hugetlbfs(path: str) -> None:
    """`--hugetlbfs PATH` must be a mounted hugetlbfs with free huge pages (obs-build's kvm check)."""
    real = os.path.realpath(path)
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        mounts = []
    if not any(f.split()[1:3] == [real, "hugetlbfs"] for f in mounts if len(f.split()) >= 3):
        raise UsageError(f"--hugetlbfs {path}: not a mounted hugetlbfs (mount -t hugetlbfs none {path})")
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:") and line.split()[1] == "0":
            raise HostBroken(f"--hugetlbfs {path}: no free huge pages (see /proc/sys/vm/nr_hugepages)")


@dataclass(frozen=True)
class QemuMachine:
    """One qemu run over a root and (optionally) a swap image or block device."""

    root: Path
    swap: Path | None
    kernel: Path
    initrd: Path | None
    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = 1
    accel: str = "tcg"
    fstype: str = "ext4"
    root_options: str = "noatime"
    hugetlbfs: str | None = None
    extra_append: str = ""
    firmware: str | None = "auto"  # "auto": qboot where installed (pc machines), None: qemu's default

    def bios(self) -> str | None:
        """qboot instead of SeaBIOS: a minimal firmware that goes straight to the kernel (~0.3 s less under TCG)."""
        if self.firmware != "auto":
            return self.firmware
        _, machine, _ = host_arch()
        return QBOOT if machine == "pc" and Path(QBOOT).is_file() else None

    def cmdline(self) -> str:
        _, _, console = host_arch()
        words = [
            f"console={console}",
            "panic=-1",  # reboot at once on a panic: -no-reboot turns that into a qemu exit
            "quiet",
            f"root={GUEST_ROOT}",
            f"rootfstype={self.fstype}",
        ]
        if self.root_options:
            words.append(f"rootflags={self.root_options}")
        if self.accel == "kvm":
            words += ["no-kvmclock", "nmi_watchdog=0"]
        if self.extra_append:
            words.append(self.extra_append)
        return " ".join(words)

    def argv(self) -> list[str]:
        binary, machine, _ = host_arch()
        qemu = which(binary)
        if qemu is None:
            raise HostBroken(f"{binary} not found: install qemu-system-x86 (Debian) or qemu-kvm")
        argv = [
            *_personality_prefix(),
            str(qemu),
            "-no-reboot",
            "-nographic",
            "-nodefaults",
            "-no-user-config",
            "-machine",
            f"{machine},accel={self.accel}",
            "-cpu",
            "host" if self.accel == "kvm" else "max",
            "-smp",
            str(self.cpus),
            "-m",
            str(self.memory_mib),
            "-serial",
            "stdio",
            "-kernel",
            str(self.kernel),
            "-append",
            self.cmdline(),
        ]
        if self.initrd is not None:
            argv += ["-initrd", str(self.initrd)]
        bios = self.bios()
        if bios:
            argv += ["-bios", bios]
        if self.hugetlbfs:
            argv += ["-mem-prealloc", "-mem-path", self.hugetlbfs]
        for serial, (disk, name) in enumerate(((self.root, "disk"), (self.swap, "swap"))):
            if disk is None:
                continue
            argv += [
                "-drive",
                f"file={_drive_path(disk)},format=raw,if=none,id={name},cache=unsafe",
                "-device",
                f"virtio-blk-pci,drive={name},serial={serial}",
            ]
        return argv


def _drive_path(path: Path) -> str:
    text = str(path)
    if "," in text:
        return text.replace(",", ",,")  # qemu's option syntax escapes a comma by doubling it
    return text


@register
class QemuBackend(ProcessMachineBackend):
    name: ClassVar[str] = "qemu"
    accel: ClassVar[str] = "tcg"
    guest_swap_device: ClassVar[str | None] = GUEST_SWAP

    def __init__(self, options: VmOptions):
        super().__init__(options)
        self.root_kernel: Path | None = None
        self.root_initrd: Path | None = None
        self.root_modules: Path | None = None  # the build root kernel's modules, copied out
        self._boot: tuple[Path, Path | None] | None = None

    # --- before anything is created ---------------------------------------------------------

    def verify(self) -> None:
        options = self.options
        binary, _, _ = host_arch()
        if which(binary) is None:
            raise HostBroken(f"{binary} not found: install qemu-system-x86 (Debian) or qemu-kvm")
        for name, value in (("--vm-kernel", options.vm_kernel), ("--vm-initrd", options.vm_initrd)):
            if value is not None and not Path(value).is_file():
                raise UsageError(f"{name} {value}: no such file")
        if options.hugetlbfs:
            check_hugetlbfs(options.hugetlbfs)
        if options.vm_memory is not None and options.vm_memory < 128:
            raise UsageError(f"--vm-memory {options.vm_memory}: a build machine needs 128 MiB at least")
        # resolve (and cache) kernel and initramfs now, so a host unfit to boot fails before any disk work
        self._boot = self.boot_files()

    def volumes(self, slot: BuildSlot) -> VolumePair:
        self.workdir = slot.workdir
        self.pair = local_volumes(self.options, slot.workdir)
        return self.pair

    def kernel_files(self, buildroot: Path) -> None:
        """Copy out `.build.kernel.<type>` and `.build.initrd.<type>` (obs-build's vm_first_stage)."""
        if self.options.vm_kernel or self.workdir is None:
            return
        kernel = buildroot / f".build.kernel.{self.name}"
        if not kernel.is_file() or kernel.is_symlink():
            return
        folder = self.workdir / "boot"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernel, folder / "kernel")
        self.root_kernel = folder / "kernel"
        initrd = buildroot / f".build.initrd.{self.name}"
        if initrd.is_file() and not initrd.is_symlink():
            shutil.copyfile(initrd, folder / "initrd")
            self.root_initrd = folder / "initrd"
        elif not self.options.vm_initrd:
            self._copy_root_modules(buildroot, kernel_release(self.root_kernel), folder / "modules")
        self._boot = None
        log.info("using the build root's kernel", kernel=str(kernel), initrd=str(self.root_initrd))

    def _copy_root_modules(self, buildroot: Path, release: str, target: Path) -> None:
        """Our initramfs for the build root's kernel needs that kernel's modules: copy the few it
        loads (and modules.dep) out of the build root, unless the host has them."""
        if (Path("/lib/modules") / release).is_dir():
            return
        source = buildroot / "lib/modules" / release
        if not (source / "modules.dep").is_file() or source.is_symlink():
            return  # boot_files() says what is missing
        wanted = kmod.ModuleIndex.load(source).resolve(list(initramfs.module_list(self.options.filesystem)))
        for name in ("modules.dep", "modules.builtin", *wanted):
            path = source / name
            if path.is_file() and not path.is_symlink():
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target / name)
        self.root_modules = target

    def boot_files(self) -> tuple[Path, Path | None]:
        """(kernel to pass to -kernel, initrd) following the precedence in the module docstring."""
        options = self.options
        kernel = Path(options.vm_kernel) if options.vm_kernel else self.root_kernel or host_kernel()
        initrd: Path | None
        if options.vm_initrd:
            initrd = agentroot.with_agent(Path(options.vm_initrd), options.filesystem)
        elif self.root_initrd is not None and not options.vm_kernel:
            initrd = self.root_initrd
        else:
            release = kernel_release(kernel)
            modules = Path("/lib/modules") / release
            if not modules.is_dir() and self.root_modules is not None and kernel == self.root_kernel:
                modules = self.root_modules
            if not modules.is_dir():
                raise HostBroken(
                    f"kernel {kernel} ({release}) has no modules in {modules}: install them, "
                    "or pass an initrd that starts the agent with --vm-initrd"
                )
            initrd = initramfs.build_initramfs(release, modules, initramfs.module_list(options.filesystem))
        return bootable_kernel(kernel), initrd

    # --- the build ---------------------------------------------------------------------------

    def machine(self, pair: VolumePair) -> QemuMachine:
        if self._boot is None:
            self._boot = self.boot_files()
        kernel, initrd = self._boot
        options = self.options
        return QemuMachine(
            root=image_path(pair.root, "qemu"),
            swap=image_path(pair.swap, "qemu") if pair.swap is not None else None,
            kernel=kernel,
            initrd=initrd,
            memory_mib=options.vm_memory or DEFAULT_MEMORY_MIB,
            cpus=options.jobs,
            accel=self.accel,
            fstype=options.filesystem,
            root_options=mount_options(options.filesystem, options.mount_options),
            hugetlbfs=options.hugetlbfs,
        )

    def boot_and_wait(
        self, pair: VolumePair, slot: BuildSlot, *, timeout: float | None, console: Console
    ) -> BootResult:
        return self.boot_process(
            self.machine(pair).argv(), pair, slot, console, timeout=timeout, name=self.name
        )

    def cleanup(self) -> None:
        super().cleanup()
        if self.workdir is not None:
            shutil.rmtree(self.workdir / "boot", ignore_errors=True)
