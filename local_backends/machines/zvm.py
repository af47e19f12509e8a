"""`--vm-type zvm`: builds in a z/VM guest (the *worker*) whose root and swap are its minidisks.

This worker host is itself a z/VM guest (the *controller*). A minidisk is either linked into the
build worker (while it builds) or linked here, at a local device number, and set online with
`dasd_configure` (while we format, stage, read the status and extract). obs-build's rules kept:

- local device numbers are 300+N for the root and 400+N for the swap of worker number N < 100,
  so up to 100 workers share one controller;
- the worker's root/swap minidisks default to 0150 and 0250 (`--vm-volumes ROOT SWAP` overrides);
- the controller's own root (0150 here) is never detached;
- before a build (in `verify`, as obs-build), `worker_init` removes what a crashed run left (mounts, online DASDs, links),
  then forces the worker off and logs it on again (`xautolog`), redefines its memory
  (`define storage`, which resets it) and takes the minidisks away from it;
- boot: link both minidisks into the worker, IPL its root, follow the IUCV console until it ends
  (or, without `iucvconn`, until the worker logs off: the kernel gets `vmpoff=LOGOFF`);
- kill: `vmcp force` the worker.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import ClassVar

from cloudbuild.backend import Backend, BootResult, BuildSlot, Console, ExitReason, register
from cloudbuild.deadline import Deadline
from cloudbuild.disk.image import is_block_device
from cloudbuild.errors import InfraError, UsageError
from cloudbuild.log import get_logger
from cloudbuild.options import VmOptions
from cloudbuild.retry import wait_for
from cloudbuild.runner import CommandError, run, spawn, terminate, which
from cloudbuild.volume import Role, Volume, VolumePair, VolumeState
from local_backends.initrd import merge_modules
from local_backends.machines.vmproc import pump

log = get_logger(__name__)

DEFAULT_ROOT_DISK = "0150"
DEFAULT_SWAP_DISK = "0250"
LOCAL_ROOT = ("150", "0150")  # the controller's own root: never detach it
MAX_WORKERS = 100
LINK_MODE = "MW"
GUEST_INIT = "/.build/build"
KERNEL_PARAMETERS = "hvc_iucv=8 console=hvc0 hardened_usercopy=off vmpoff=LOGOFF"
_DISK = re.compile(r"[0-9A-Fa-f]{4}")
_USER = re.compile(r"[A-Za-z0-9$#@_-]{1,8}")


def local_devnr(role: Role, worker_nr: int) -> str:
    """The device number a worker's root/swap minidisk gets when linked here (obs-build's scheme)."""
    if not 0 <= worker_nr < MAX_WORKERS:
        raise UsageError(f"--vm-worker-nr {worker_nr}: one controller serves workers 0 to {MAX_WORKERS - 1}")
    return str((300 if role is Role.ROOT else 400) + worker_nr)


def bus_id(devnr: str) -> str:
    return f"0.0.{int(devnr, 16):04x}" if len(devnr) == 4 else f"0.0.0{devnr}"


def prevent_detach(devnr: str) -> None:
    if devnr in LOCAL_ROOT:
        raise InfraError(f"refusing to detach device {devnr}: it is the controller's own root")


def vmcp(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run(["vmcp", *args], check=check, timeout=timeout)


def logged_on(user: str) -> bool:
    return vmcp("q", user, check=False).returncode == 0


class ZvmMinidisk(Volume):
    """A minidisk of the build worker: linked into the worker, or linked and online here."""

    def __init__(
        self,
        role: Role,
        *,
        worker: str,
        disk: str,
        worker_nr: int,
        sys_root: Path = Path("/sys"),
        dev_root: Path = Path("/dev"),
        size_mib: int = 0,
    ):
        super().__init__(role, size_mib, owned=False)  # minidisks are defined in the user directory
        self.worker = worker
        self.disk = disk
        self.devnr = local_devnr(role, worker_nr)
        self.sys_root = sys_root
        self.dev_root = dev_root
        self.in_worker = False  # linked into the worker by us (nothing else tells us from outside)

    @property
    def id(self) -> str:
        return f"{self.worker}:{self.disk}"

    @property
    def _sys_block(self) -> Path:
        return self.sys_root / "bus" / "ccw" / "devices" / bus_id(self.devnr) / "block"

    def local_block(self) -> str | None:
        """The kernel name of the DASD when this minidisk is online here (`dasdb`), else None."""
        try:
            names = sorted(p.name for p in self._sys_block.iterdir())
        except OSError:
            return None
        return names[0] if names else None

    def linked_here(self) -> bool:
        return vmcp("q", "v", self.devnr, check=False).returncode == 0

    def create(self, *, deadline: Deadline | None = None) -> None:
        """Minidisks exist in the user directory; nothing to create."""

    def delete(self) -> None:
        """Never deleted: the next build wipes it with mkfs."""

    def state(self) -> VolumeState:
        if self.local_block() is not None or self.linked_here():
            return VolumeState.ATTACHED
        return VolumeState.IN_USE if self.in_worker else VolumeState.AVAILABLE

    def attach(self, host: str | None = None, *, deadline: Deadline | None = None) -> Path | None:
        if host is not None:
            self._attach_to_worker(host)
            return None
        if self.in_worker:
            self._detach_from_worker()
        block = self.local_block()
        if block is None:
            if not self.linked_here():
                try:
                    vmcp("link", self.worker, self.disk, self.devnr, LINK_MODE)
                except CommandError as exc:
                    raise InfraError(
                        f"could not link disk {self.disk} of {self.worker} to local device {self.devnr}: {exc}"
                    ) from exc
            run(["dasd_configure", bus_id(self.devnr), "1", "0"], timeout=120)
            _settle()
            block = wait_for(
                self.local_block, what=f"DASD {bus_id(self.devnr)} to come online", timeout=60, interval=0.05
            )
        device = self.dev_root / f"{block}1"
        wait_for(lambda: device.exists() or None, what=f"{device} to appear", timeout=30, interval=0.05)
        if not is_block_device(device):
            raise InfraError(
                f"{bus_id(self.devnr)} has not been set up correctly: {device} is not a block device"
            )
        return device

    def _attach_to_worker(self, worker: str) -> None:
        if worker != self.worker:
            raise InfraError(f"minidisk {self.id} belongs to {self.worker}, not {worker}")
        self.detach_local()
        try:
            vmcp("send", self.worker, "cp", "link", "*", self.disk, self.disk)
        except CommandError as exc:
            raise InfraError(f"could not link disk {self.disk} into worker {self.worker}: {exc}") from exc
        self.in_worker = True

    def _detach_from_worker(self, *, check: bool = True) -> None:
        try:
            vmcp("send", self.worker, "cp", "detach", self.disk, check=check)
        except CommandError as exc:
            raise InfraError(f"could not detach disk {self.disk} from worker {self.worker}: {exc}") from exc
        self.in_worker = False

    def detach_local(self) -> None:
        """Take the DASD offline and drop the local link (unmounting a leftover mount first)."""
        prevent_detach(self.devnr)
        block = self.local_block()
        if block is not None:
            _umount_device(self.dev_root, block)
            run(["sync"], check=False)
            run(["dasd_configure", bus_id(self.devnr), "0", "0"], timeout=120)
            _settle()
        elif self.devnr in run(["lsdasd", self.devnr], check=False).stdout:
            run(["dasd_configure", bus_id(self.devnr), "0", "0"], timeout=120)
        if self.linked_here():
            try:
                vmcp("detach", self.devnr)
            except CommandError as exc:
                raise InfraError(f"could not detach local device {self.devnr}: {exc}") from exc

    def detach(self, *, deadline: Deadline | None = None) -> None:
        self.detach_local()
        if self.in_worker:
            self._detach_from_worker(check=False)

    def release_from_worker(self) -> None:
        """Take the minidisk from the worker whatever we believe (the directory links it at logon)."""
        self._detach_from_worker(check=False)


def _settle() -> None:
    if which("udevadm"):
        run(["udevadm", "settle", "--timeout=30"], check=False, timeout=60)


def _umount_device(dev_root: Path, block: str) -> None:
    names = {str(dev_root / block), str(dev_root / f"{block}1")}
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] in names:
            log.warning(
                "unmounting a leftover mount of a worker disk", device=fields[0], mountpoint=fields[1]
            )
            run(["umount", fields[1]], timeout=120)


@register
class ZvmBackend(Backend):
    name = "zvm"
    # tests point these at a fake sysfs / dev folder kept by the fake dasd_configure
    sys_root: ClassVar[Path] = Path("/sys")
    dev_root: ClassVar[Path] = Path("/dev")

    def __init__(self, options: VmOptions):
        super().__init__(options)
        self.pair: VolumePair | None = None
        self._console: subprocess.Popen[bytes] | None = None

    @property
    def guest_swap_device(self) -> str:
        """What the worker calls its swap minidisk (build.data's VM_SWAP); the first partition, as obs-build."""
        return f"/dev/disk/by-path/ccw-0.0.{self.disks[1].lower()}-part1"

    @property
    def worker(self) -> str:
        if not self.options.vm_worker:
            raise UsageError("--vm-type zvm needs --vm-worker NAME (the z/VM guest that builds)")
        return self.options.vm_worker

    @property
    def worker_nr(self) -> int:
        if self.options.vm_worker_nr is None:
            raise UsageError("--vm-type zvm needs --vm-worker-nr N (0-99, picks the local device numbers)")
        return self.options.vm_worker_nr

    @property
    def disks(self) -> tuple[str, str]:
        root = self.options.vm_volume_root or DEFAULT_ROOT_DISK
        swap = self.options.vm_volume_swap or DEFAULT_SWAP_DISK
        for disk in (root, swap):
            if not _DISK.fullmatch(disk):
                raise UsageError(f"--vm-volumes: z/VM minidisk '{disk}' is not a 4-digit device number")
        return root, swap

    def kernel(self) -> Path:
        if self.options.vm_kernel:
            return Path(self.options.vm_kernel)
        if Path("/boot/vmlinux.gz").exists():
            return Path("/boot/vmlinux.gz")
        raise UsageError("--vm-type zvm: no kernel (give --vm-kernel FILE)")

    def verify(self) -> None:
        if not _USER.fullmatch(self.worker):
            raise UsageError(f"--vm-worker '{self.worker}' is not a z/VM user id")
        local_devnr(Role.ROOT, self.worker_nr)
        self.disks  # noqa: B018 - validates
        self.kernel()
        if not self.options.vm_initrd:
            raise UsageError("--vm-type zvm needs --vm-initrd FILE (the worker's initrd)")
        for tool in ("vmcp", "dasd_configure", "lsdasd"):
            if which(tool) is None:
                raise UsageError(f"--vm-type zvm: {tool} not found (install s390-tools)")
        # obs-build's vm_verify_options_zvm: before any disk is touched, the worker is reset
        self.worker_init(self.minidisks())

    def minidisks(self) -> VolumePair:
        root, swap = self.disks
        return VolumePair(root=self._minidisk(Role.ROOT, root), swap=self._minidisk(Role.SWAP, swap))

    def _minidisk(self, role: Role, disk: str) -> ZvmMinidisk:
        return ZvmMinidisk(
            role,
            worker=self.worker,
            disk=disk,
            worker_nr=self.worker_nr,
            sys_root=self.sys_root,
            dev_root=self.dev_root,
        )

    def volumes(self, slot: BuildSlot) -> VolumePair:
        """The worker's minidisks (no side effects: `cloudbuild kill` calls this too)."""
        self.pair = self.minidisks()
        return self.pair

    def worker_init(self, pair: VolumePair) -> None:
        """Clean up after a crashed run, restart the worker, set its memory, take its disks."""
        for disk in pair:
            assert isinstance(disk, ZvmMinidisk)
            disk.detach_local()
        self.logon()
        for disk in pair:
            assert isinstance(disk, ZvmMinidisk)
            disk.release_from_worker()

    def logon(self) -> None:
        worker = self.worker
        if logged_on(worker):
            vmcp("force", worker, check=False)
            wait_for(lambda: not logged_on(worker), what=f"{worker} to log off", timeout=60, interval=0.2)
        try:
            vmcp("xautolog", worker)
        except CommandError as exc:
            raise InfraError(
                f"could not start {worker}: is it defined in the user directory? ({exc})"
            ) from exc
        wait_for(lambda: logged_on(worker), what=f"{worker} to log on", timeout=60, interval=0.2)
        if self.options.vm_memory:
            # defining the storage also resets the worker's operating system
            try:
                vmcp("send", worker, "cp", "define", "storage", f"{self.options.vm_memory}M")
            except CommandError as exc:
                raise InfraError(f"could not redefine the storage of {worker}: {exc}") from exc

    def fixup(self, buildroot: Path) -> None:
        """Put the kernel and the initrd (with the build root's modules) on the root disk and write
        the boot record (zipl)."""
        boot = buildroot / "boot"
        (boot / "zipl").mkdir(parents=True, exist_ok=True)
        kernel = buildroot / ".build.kernel.kvm"
        if not kernel.is_file() or kernel.is_symlink():
            kernel = boot / "cloudbuild.kernel"
            shutil.copyfile(self.kernel(), kernel)
        initrd = boot / "cloudbuild.initrd"
        # the worker's initrd knows only its own kernel's modules: add the build root's
        merge_modules(Path(str(self.options.vm_initrd)), buildroot, initrd)
        root_disk = self.disks[0].lower()
        parameters = (
            f"root=/dev/disk/by-path/ccw-0.0.{root_disk}-part1 {KERNEL_PARAMETERS} "
            f"init={GUEST_INIT} rootfsopts=noatime"
        )
        run(
            ["zipl", "-t", boot / "zipl", "-i", kernel, "-r", initrd, "--parameters", parameters], timeout=300
        )
        _settle()

    def boot_and_wait(
        self, pair: VolumePair, slot: BuildSlot, *, timeout: float | None, console: Console
    ) -> BootResult:
        worker = self.worker
        for disk in pair:
            disk.attach(worker)
        if not logged_on(worker):
            raise InfraError(f"worker {worker} is not logged on")
        try:
            vmcp("send", worker, "cp", "ipl", self.disks[0])
        except CommandError as exc:
            raise InfraError(f"could not IPL {worker}: {exc}") from exc
        timed_out = self._follow_console(worker, timeout, console)
        if timed_out:
            self.kill()
            return BootResult(ExitReason.TIMEOUT, detail=f"no end of the build after {timeout:g}s")
        # a build may change the shutdown behaviour: take the disks back if it is still logged on
        if logged_on(worker):
            for disk in pair:
                disk.detach()
        else:
            for disk in pair:
                assert isinstance(disk, ZvmMinidisk)
                disk.in_worker = False  # logging off dropped its links
        return BootResult(ExitReason.POWERED_OFF)

    def _follow_console(self, worker: str, timeout: float | None, console: Console) -> bool:
        """Stream the IUCV console until it closes (or the worker logs off); True on timeout."""
        if which("iucvconn") is None:
            try:
                wait_for(
                    lambda: not logged_on(worker),
                    what=f"{worker} to log off",
                    timeout=timeout if timeout is not None else 10**9,
                    interval=1.0,
                    max_interval=5.0,
                )
            except InfraError:
                return True
            return False
        proc = spawn(["iucvconn", worker, "lnxhvc0"])
        self._console = proc
        assert proc.stdout is not None
        reader = threading.Thread(target=pump, args=(proc.stdout, console), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            terminate(proc)
            return True
        finally:
            reader.join(timeout=5)
            self._console = None
        return False

    def kill(self) -> None:
        worker = self.worker
        if logged_on(worker):
            try:
                vmcp("force", worker)
            except CommandError as exc:
                raise InfraError(f"could not force worker {worker}: {exc}") from exc
        if self._console is not None:
            terminate(self._console)

    def cleanup(self) -> None:
        if self._console is not None:
            terminate(self._console)
            self._console = None
