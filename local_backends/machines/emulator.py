"""`--vm-type emulator`: a site-provided script runs the build machine (obs-build's `build-vm-emulator`).

The protocol, as obs-build's:
- the emulator folder is `$BUILD_DIR/emulator` (BUILD_DIR defaults to /usr/lib/build); the script
  is `--emulator-script` (default `emulator.sh`), a relative name meaning that folder's file;
  it runs *in* that folder as `SCRIPT ROOT_IMAGE SWAP_IMAGE` and returns when the machine is
  done; a non-zero exit is an infrastructure failure (exit 3);
- `verify-options.sh` in the folder, when present, is sourced (by `sh`) and decides whether the
  emulator gives the guest a swap disk (`VM_SWAP` left set) and what the guest calls it
  (`VM_SWAPDEV`); without it the emulator has no swap (`VM_SWAP=`);
- with a swap, the results come back through the swap channel like every VM's;
- without one, the guest leaves its status in /.build/_exitcode and its results in /.build.out of
  the root image. obs-build then loop-mounts the image ("not safe against attacks"); we never let
  the host kernel mount it: `e2manifest` reads the ext2/3/4 image in userspace with debugfs and
  writes status and manifest onto a host-only swap image, and the ordinary extraction copies the
  results out of the raw image. So an emulator without swap needs --vm-disk-filesystem ext2/3/4.
- kill: every process holding the root image (`fuser -k -TERM`).

The guest side: the emulator's kernel boots the build root's /sbin/init, which `fixup` links to
our agent (copied with its python and busybox into /.build/agent, as obs-build links /sbin/init
to /.build/build); the agent follows the contract of `cloudbuild/buildroot/stage.py`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

from cloudbuild.backend import BootResult, BuildSlot, Console, ExitReason, register
from cloudbuild.disk import buildstatus
from cloudbuild.errors import HostBroken, InfraError, UntrustedData, UsageError
from cloudbuild.log import get_logger
from cloudbuild.options import VmOptions
from cloudbuild.runner import CommandError, run, which
from cloudbuild.volume import Role, VolumePair
from local_backends import agentroot, e2manifest
from local_backends.localvolume import LocalVolume, image_path, local_volumes
from local_backends.machines.vmproc import ProcessMachineBackend

log = get_logger(__name__)

DEFAULT_SCRIPT = "emulator.sh"
DEFAULT_SWAPDEV = "/dev/vdb"
HOST_SWAP_MIB = 64  # the host-only swap that carries status + manifest read from the image
MANIFEST_PAD = 512
E2_FILESYSTEMS = ("ext2", "ext3", "ext4")


def emulator_dir() -> Path:
    return Path(os.environ.get("BUILD_DIR", "/usr/lib/build")) / "emulator"


def script_path(options: VmOptions) -> Path:
    """obs-build: no script -> ./emulator.sh; a relative name -> ./NAME, both in the emulator folder."""
    name = options.emulator_script or DEFAULT_SCRIPT
    return Path(name) if name.startswith("/") else emulator_dir() / name


def swap_offer(folder: Path) -> str | None:
    """The guest's swap device when `verify-options.sh` keeps VM_SWAP, None when there is no swap."""
    hook = folder / "verify-options.sh"
    if not hook.is_file():
        return None  # obs-build: VM_SWAP=
    env = {**os.environ, "VM_SWAP": "swap", "VM_SWAPDEV": DEFAULT_SWAPDEV}
    try:
        proc = run(
            ["sh", "-c", '. ./verify-options.sh >&2; printf "%s\\n%s\\n" "$VM_SWAP" "$VM_SWAPDEV"'],
            cwd=folder,
            env=env,
            timeout=60,
        )
    except CommandError as exc:
        raise HostBroken(f"{hook} failed: {exc}") from exc
    lines = [*proc.stdout.splitlines(), "", ""][:2]
    return (lines[1] or DEFAULT_SWAPDEV) if lines[0] else None


@register
class EmulatorBackend(ProcessMachineBackend):
    kill_image_holders_always: ClassVar[bool] = True  # what the script started may outlive it

    name: ClassVar[str] = "emulator"

    def __init__(self, options: VmOptions):
        super().__init__(options)
        self._guest_swap: str | None = None
        self._checked = False

    @property
    def guest_swap_device(self) -> str | None:
        return self._guest_swap

    @property
    def emulator_has_swap(self) -> bool:
        return self._guest_swap is not None

    def verify(self) -> None:
        script = script_path(self.options)
        if not script.is_file() or not os.access(script, os.X_OK):
            raise UsageError(
                f"--emulator-script {script}: no such executable (relative names are in {emulator_dir()})"
            )
        self._guest_swap = swap_offer(emulator_dir())
        self._checked = True
        if self._guest_swap is None:
            if self.options.filesystem not in E2_FILESYSTEMS:
                raise UsageError(
                    "--vm-type emulator without swap: the results are read with debugfs, use "
                    f"--vm-disk-filesystem {'/'.join(E2_FILESYSTEMS)} (not {self.options.filesystem})"
                )
            if which("debugfs") is None:
                raise HostBroken("debugfs not found: install e2fsprogs")

    def volumes(self, slot: BuildSlot) -> VolumePair:
        self.workdir = slot.workdir
        if not self._checked:
            self._guest_swap = swap_offer(emulator_dir())
        if self.emulator_has_swap:
            self.pair = local_volumes(self.options, slot.workdir)
        else:
            root = local_volumes(self.options, slot.workdir, swap=False).root
            host_swap = LocalVolume(Role.SWAP, slot.workdir / "emulator-results.swap", HOST_SWAP_MIB)
            self.pair = VolumePair(root, host_swap)
        return self.pair

    def fixup(self, buildroot: Path) -> None:
        """obs-build links /sbin/init to its 2nd stage for emulators that boot the root's init: ours
        is the agent, copied with its runtime into the root (agentroot.install_init)."""
        agentroot.install_init(buildroot)

    def boot_and_wait(
        self, pair: VolumePair, slot: BuildSlot, *, timeout: float | None, console: Console
    ) -> BootResult:
        root = image_path(pair.root, "the emulator")
        swap = (
            image_path(pair.swap, "the emulator")
            if pair.swap is not None and self.emulator_has_swap
            else None
        )
        folder = emulator_dir()
        argv = [str(script_path(self.options)), str(root), str(swap) if swap else ""]
        # at the timeout, also stop what the script started (stop=self.kill: whatever holds the image)
        result = self.boot_process(
            argv,
            pair,
            slot,
            console,
            timeout=timeout,
            name=f"emulator {argv[0]}",
            stop=self.kill,
            cwd=folder if folder.is_dir() else None,
        )
        if result.reason is not ExitReason.POWERED_OFF:
            return result
        if not self.emulator_has_swap and pair.swap is not None:
            self.results_from_image(root, image_path(pair.swap, "the emulator"))
        return BootResult(ExitReason.POWERED_OFF)

    def results_from_image(self, root: Path, host_swap: Path) -> None:
        """Status and manifest of a swap-less guest, read from its image in userspace onto our swap."""
        status = e2manifest.read_exit_file(root)
        if status is None:
            log.warning("the emulator's guest left no /.build/_exitcode")
            return  # no status on the swap: the orchestrator reports exit 3
        # a failed build hands back its statistics alone, as through a swap
        names = (b"results", b"_statistics") if status in (0, 2) else (b"_statistics",)
        try:
            text = e2manifest.image_manifest(root, names=names)
        except UntrustedData as exc:
            if status in (0, 2):
                raise
            log.warning("no statistics of the failed build", error=str(exc))
            text = b""
        if MANIFEST_PAD + len(text) > HOST_SWAP_MIB * 1024 * 1024:
            raise InfraError("the result manifest does not fit on the host-side swap")
        if text:
            fd = os.open(host_swap, os.O_WRONLY)
            try:
                os.pwrite(fd, b"\n" * MANIFEST_PAD + text + b"\n" * MANIFEST_PAD, 0)
            finally:
                os.close(fd)
        buildstatus.write(host_swap, status)
