"""`--vm-type xen`: the build machine is a Xen PV/PVH domain started with `xl` (or `xm`).

As obs-build's `build-vm-xen`:
- the tool is `xm` where it exists, else `xl`; with `xl` the guest sees its disks as /dev/xvda
  and /dev/xvdb and its console as hvc0, with `xm` as /dev/hda1, /dev/hda2 and ttyS0;
- a configuration file gives kernel, ramdisk, memory, vcpus (from `--jobs`), root, extra and
  `on_poweroff/on_reboot/on_crash = "destroy"`; the command line adds the domain name
  `build_<build id>`, the disks (`file:` for an image, `phy:` for a block device) and the kernel
  parameters (`extra=`, with `init=`);
- a domain that already exists when we start is refused (another service may run the same
  build); one left by a crashed run of the same `--build-id` is purged (destroyed) in `verify`,
  before any disk is touched;
- `xl create -c` follows the console and returns when the domain is gone; kill is
  `xl destroy build_<id>`.

The kernel is `--vm-kernel`, else /boot/vmlinuz-xen or /boot/vmlinuz; the ramdisk is
`--vm-initrd`, else the agent's initramfs built for that kernel with the Xen block driver.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from cloudbuild.backend import BootResult, BuildSlot, Console, register
from cloudbuild.disk.mkfs import mount_options
from cloudbuild.errors import HostBroken, InfraError, UsageError
from cloudbuild.log import get_logger
from cloudbuild.options import VmOptions
from cloudbuild.runner import CommandError, run, which
from cloudbuild.volume import VolumePair
from local_backends.localvolume import image_path, local_volumes
from local_backends.machines.vmproc import ProcessMachineBackend

log = get_logger(__name__)

DEFAULT_MEMORY_MIB = 512
GUEST_INIT = "/init"  # the agent's initramfs
XEN_MODULES = ("xen-blkfront",)


def xen_tool() -> str:
    """obs-build: `xm` unless only `xl` exists."""
    if which("xm") is not None:
        return "xm"
    if which("xl") is not None:
        return "xl"
    raise HostBroken("--vm-type xen: neither xl nor xm found (install xen-utils)")


def devices(tool: str) -> tuple[str, str, str]:
    """(root device, swap device, console) the guest sees."""
    return ("/dev/xvda", "/dev/xvdb", "hvc0") if tool == "xl" else ("/dev/hda1", "/dev/hda2", "ttyS0")


def disk_spec(path: Path, guest_device: str) -> str:
    """`file:/abs/image,xvda,w` or `phy:/dev/sdX,xvda,w` (a block device)."""
    real = path.resolve()
    for c in ",\"'[] \t\n":
        if c in str(real):
            raise UsageError(
                f"xen: the disk path {str(real)!r} contains {c!r}, which xl's disk syntax cannot carry"
            )
    kind = "phy" if str(real).startswith("/dev/") else "file"
    return f"{kind}:{real},{guest_device.removeprefix('/dev/')},w"


def domain_name(build_id: str) -> str:
    return f"build_{build_id}"


def config_text(
    *, kernel: Path, initrd: Path | None, memory_mib: int, vcpus: int, root_device: str, console: str
) -> str:
    lines = [f'kernel = "{kernel}"']
    if initrd is not None:
        lines.append(f'ramdisk = "{initrd}"')
    lines += [
        f"memory = {memory_mib}",
        f"vcpus = {vcpus}",
        f'root = "{root_device} ro"',
        f'extra = "init={GUEST_INIT} console={console} panic=1 udev_timeout=360"',
        'on_poweroff = "destroy"',
        'on_reboot = "destroy"',
        'on_crash = "destroy"',
    ]
    return "\n".join(lines) + "\n"


@register
class XenBackend(ProcessMachineBackend):
    name: ClassVar[str] = "xen"

    def __init__(self, options: VmOptions):
        super().__init__(options)
        try:
            self.tool = xen_tool()
        except HostBroken:
            self.tool = "xl"  # verify() reports it
        self.build_id: str | None = None
        self._initrd: Path | None = None

    @property
    def guest_swap_device(self) -> str:
        return devices(self.tool)[1]

    def kernel(self) -> Path:
        if self.options.vm_kernel:
            return Path(self.options.vm_kernel)
        for candidate in (Path("/boot/vmlinuz-xen"), Path("/boot/vmlinuz")):
            if candidate.exists():
                return candidate
        from local_backends.kernel import host_kernel

        return host_kernel()

    def initrd(self) -> Path:
        if self.options.vm_initrd:
            return Path(self.options.vm_initrd)
        from local_backends import initramfs
        from local_backends.kernel import kernel_release

        release = kernel_release(self.kernel())
        modules = Path("/lib/modules") / release
        if not modules.is_dir():
            raise HostBroken(f"kernel {self.kernel()} has no modules in {modules}: pass --vm-initrd")
        return initramfs.build_initramfs(
            release, modules, initramfs.module_list(self.options.filesystem, XEN_MODULES)
        )

    def verify(self) -> None:
        self.tool = xen_tool()
        kernel = self.kernel()
        if not kernel.is_file():
            raise UsageError(f"--vm-kernel {kernel}: no such file")
        if self.options.vm_initrd and not Path(self.options.vm_initrd).is_file():
            raise UsageError(f"--vm-initrd {self.options.vm_initrd}: no such file")
        self._initrd = self.initrd()
        if self.options.build_id:
            self.purge(domain_name(self.options.build_id))

    def volumes(self, slot: BuildSlot) -> VolumePair:
        self.workdir = slot.workdir
        self.build_id = slot.build_id
        self.pair = local_volumes(self.options, slot.workdir)
        return self.pair

    def exists(self, name: str) -> bool:
        return run([self.tool, "list", name], check=False, timeout=60).returncode == 0

    def purge(self, name: str) -> None:
        """obs-build's vm_purge_xen: a domain that got lost is destroyed, quietly."""
        if self.exists(name):
            log.warning("destroying a leftover domain", domain=name)
            run([self.tool, "destroy", name], check=False, timeout=120)

    def argv(self, pair: VolumePair, config: Path, name: str) -> list[str]:
        root_dev, swap_dev, console = devices(self.tool)
        disks = [disk_spec(image_path(pair.root, "xen"), root_dev)]
        if pair.swap is not None:
            disks.append(disk_spec(image_path(pair.swap, "xen"), swap_dev))
        fs = self.options.filesystem
        params = ["panic=1", "quiet", f"init={GUEST_INIT}", f"rootfstype={fs}"]
        flags = mount_options(fs, self.options.mount_options)
        if flags:
            params.append(f"rootflags={flags}")
        if pair.swap is not None:
            params.append(f"cloudbuild.swap={swap_dev}")
        params += ["rd.driver.pre=binfmt_misc", "elevator=noop", f"console={console}"]
        extra = " ".join(params)
        if self.tool == "xm":
            return [
                "xm",
                "create",
                "-c",
                str(config),
                f"name={name}",
                *(f"disk={d}" for d in disks),
                f"extra={extra}",
            ]
        disk_list = ", ".join(f'"{d}"' for d in disks)
        return [
            "xl",
            "create",
            "-c",
            str(config),
            f'name="{name}"',
            f"disk=[ {disk_list} ]",
            f'extra="{extra}"',
        ]

    def boot_and_wait(
        self, pair: VolumePair, slot: BuildSlot, *, timeout: float | None, console: Console
    ) -> BootResult:
        self.build_id = slot.build_id
        name = domain_name(slot.build_id)
        if self.exists(name):
            raise InfraError(
                f"xen domain {name} already exists: something really went wrong "
                "(is another service running the same build?)"
            )
        root_dev, _, xen_console = devices(self.tool)
        config = slot.workdir / "xen.conf"
        config.write_text(
            config_text(
                kernel=self.kernel().resolve(),
                initrd=(self._initrd or self.initrd()).resolve(),
                memory_mib=self.options.vm_memory or DEFAULT_MEMORY_MIB,
                vcpus=self.options.jobs,
                root_device=root_dev,
                console=xen_console,
            )
        )
        # at the timeout the domain is destroyed first; `xl create -c` (only its console) then ends
        return self.boot_process(
            self.argv(pair, config, name),
            pair,
            slot,
            console,
            timeout=timeout,
            name=f"{self.tool} create",
            stop=self.kill,
        )

    def kill(self) -> None:
        """`xl destroy build_<id>` when it exists; idempotent."""
        self._killed = True
        if self.build_id is not None:
            name = domain_name(self.build_id)
            if self.exists(name):
                try:
                    run([self.tool, "destroy", name], timeout=120)
                except CommandError as exc:
                    raise InfraError(f"could not kill xen domain {name}: {exc}") from exc
        self.stop_processes()

    def cleanup(self) -> None:
        super().cleanup()
        if self.workdir is not None:
            (self.workdir / "xen.conf").unlink(missing_ok=True)
