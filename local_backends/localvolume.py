"""LocalVolume: an image file or a block device on this host as the root or swap of a build.

obs-build's `vm_setup` for the local hypervisors: `--vm-disk`/`--vm-swap` name the disks
(default `<root>.img` and `<root>.swap` beside the build root), `--vm-disk-size` and
`--vm-swap-size` size new images, `--vmdisk-clean` deletes old image files first.

Ownership: an image this build created at a path nobody named is *owned* and deleted at the
end. A path the user named (`--vm-disk`, `--vm-swap`, or the `--root` defaults that obs-build
keeps between builds) is not: it is kept, and a block device is never deleted or recreated,
whatever the options say. "Attaching here" is just the path: the host reads and writes the
image (or device) directly, and the hypervisor opens the same path.
"""

from __future__ import annotations

import stat
from collections.abc import Mapping
from pathlib import Path

from cloudbuild.deadline import Deadline
from cloudbuild.disk.image import create_image, is_block_device, zero_head
from cloudbuild.errors import InfraError, UsageError
from cloudbuild.log import get_logger
from cloudbuild.options import VmOptions
from cloudbuild.volume import Role, Volume, VolumePair, VolumeState

log = get_logger(__name__)


class LocalVolume(Volume):
    def __init__(
        self,
        role: Role,
        path: Path,
        size_mib: int,
        *,
        owned: bool = True,
        clean: bool = False,
        tags: Mapping[str, str] | None = None,
    ):
        super().__init__(role, size_mib, owned=owned, tags=tags)
        self.path = path
        self.clean = clean
        self.attached_to: str | None = None
        self.created = False

    @property
    def local_path(self) -> Path | None:
        return self.path

    @property
    def id(self) -> str:
        return str(self.path)

    @property
    def is_block_device(self) -> bool:
        return is_block_device(self.path)

    def create(self, *, deadline: Deadline | None = None) -> None:
        """Create the image (or reuse it); with `clean`, delete an old image file first."""
        if self.path.is_symlink() and not self.path.exists():
            raise UsageError(f"{self.role.value} disk {self.path} is a dangling symlink")
        if self.path.exists():
            mode = self.path.stat().st_mode
            if stat.S_ISBLK(mode):
                return  # a device: never deleted or resized, only wiped by the build steps
            if not stat.S_ISREG(mode):
                raise UsageError(
                    f"{self.role.value} disk {self.path} is neither an image file nor a block device"
                )
            if not self.clean:
                if self.path.stat().st_size < self.size_mib * 1024 * 1024 and self.role is Role.ROOT:
                    log.warning(
                        "existing image is smaller than --vm-disk-size, using it as it is",
                        path=str(self.path),
                        size_mib=self.path.stat().st_size // (1024 * 1024),
                    )
                return
            log.info("deleting old image (--vmdisk-clean)", path=str(self.path))
            self.path.unlink()
        create_image(self.path, self.size_mib)
        self.created = True

    def attach(self, host: str | None = None, *, deadline: Deadline | None = None) -> Path | None:
        if not self.path.exists():
            raise InfraError(f"{self.role.value} disk {self.path} does not exist")
        self.attached_to = host
        return self.path if host is None else None

    def detach(self, *, deadline: Deadline | None = None) -> None:
        self.attached_to = None

    def delete(self) -> None:
        if not self.owned or self.is_block_device:
            return
        try:
            self.path.unlink()
            log.info("deleted image", path=str(self.path))
        except FileNotFoundError:
            pass

    def state(self) -> VolumeState:
        if not self.path.exists():
            return VolumeState.ABSENT
        return VolumeState.AVAILABLE if self.attached_to is None else VolumeState.IN_USE

    def wipe(self, device: Path) -> None:
        """Clear the status record and swap signature of a reused disk."""
        zero_head(device, 1024)


def default_paths(options: VmOptions, workdir: Path) -> tuple[Path, Path]:
    """obs-build's `$BUILD_ROOT.img` / `$BUILD_ROOT.swap` with `--root`, else inside the build's workdir."""
    if options.root:
        base = Path(options.root.rstrip("/") or "/")
        return base.with_name(base.name + ".img"), base.with_name(base.name + ".swap")
    return workdir / "root.img", workdir / "swap.img"


def local_volumes(options: VmOptions, workdir: Path, *, swap: bool = True) -> VolumePair:
    """The root and swap LocalVolumes of a build with these options (obs-build's vm_setup rules)."""
    default_root, default_swap = default_paths(options, workdir)
    named_by_user = options.root is not None  # obs-build keeps $BUILD_ROOT.img between builds
    root_path = Path(options.vm_image) if options.vm_image else default_root
    root = LocalVolume(
        Role.ROOT,
        root_path,
        options.disk_size,
        owned=not (options.vm_image or named_by_user),
        clean=options.disk_clean,
    )
    if not swap:
        return VolumePair(root)
    swap_path = Path(options.vm_swap) if options.vm_swap else default_swap
    swap_volume = LocalVolume(
        Role.SWAP,
        swap_path,
        options.swap_size,
        owned=not (options.vm_swap or named_by_user),
        clean=options.disk_clean,
    )
    if swap_volume.path.resolve() == root.path.resolve():
        raise UsageError(f"--vm-swap {swap_path} is the root disk too")
    return VolumePair(root, swap_volume)


def image_path(volume: object, machine: str) -> Path:
    """The image file or block device behind a local volume; `machine` names who needs it."""
    if not isinstance(volume, LocalVolume):
        raise InfraError(f"{volume!r}: {machine} runs on local image files or block devices only")
    return volume.path
