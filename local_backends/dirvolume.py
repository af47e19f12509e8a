"""A build root that is a host folder (chroot, lxc): the `directory` Volume kind.

"Attaching" it here returns the folder; there is nothing to detach. Deleting it is the one
dangerous operation: the guest controlled the tree, and a mount left inside it (a leaked
namespace, a bind mount) would make a recursive delete reach host files. So `delete()` refuses
while anything is mounted at or below the folder, and removes the tree with `shutil.rmtree`,
which works on directory fds and never follows a symlink.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cloudbuild.deadline import Deadline
from cloudbuild.errors import InfraError
from cloudbuild.log import get_logger
from cloudbuild.volume import Role, Volume, VolumeState

log = get_logger(__name__)


def _unescape_mount_path(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 1 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_below(folder: Path) -> list[str]:
    """Mount points at or below `folder` in this mount namespace."""
    top = os.path.realpath(folder)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
        for line in info:
            fields = line.split()
            if len(fields) > 4:
                point = _unescape_mount_path(fields[4])
                if point == top or point.startswith(top.rstrip("/") + "/"):
                    found.append(point)
    return found


class DirectoryVolume(Volume):
    """A folder on this host used as the build root of a container or chroot."""

    def __init__(self, path: Path, *, owned: bool = True, role: Role = Role.ROOT):
        super().__init__(role, 0, owned=owned)
        self.path = path

    @property
    def id(self) -> str:
        return str(self.path)

    def create(self, *, deadline: Deadline | None = None) -> None:
        if self.path.is_symlink():
            raise InfraError(f"build root {self.path} is a symlink")
        if self.path.exists() and self.owned and any(self.path.iterdir()):
            log.warning("removing a previous build root", path=str(self.path))
            self.delete()
        self.path.mkdir(parents=True, exist_ok=True, mode=0o755)

    def attach(self, host: str | None = None, *, deadline: Deadline | None = None) -> Path | None:
        if host is not None:
            return None  # the container/chroot uses the folder where it is
        if not self.path.is_dir() or self.path.is_symlink():
            raise InfraError(f"build root {self.path} is not a folder")
        return self.path

    def detach(self, *, deadline: Deadline | None = None) -> None:
        """Nothing is attached; the folder stays where it is."""

    def wipe(self, device: Path) -> None:
        """A reused folder (`owned` False) starts empty, like a freshly made filesystem."""
        self._refuse_mounted()
        for entry in os.scandir(device):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)

    def delete(self) -> None:
        if not os.path.lexists(self.path):
            return
        self._refuse_mounted()
        if self.path.is_symlink() or not self.path.is_dir():
            os.unlink(self.path)
            return
        try:
            shutil.rmtree(self.path)
        except OSError as exc:
            raise InfraError(f"cannot remove build root {self.path}: {exc}") from exc

    def _refuse_mounted(self) -> None:
        mounted = mounts_below(self.path)
        if mounted:
            raise InfraError(
                f"build root {self.path} still has mounts ({', '.join(mounted[:3])}): refusing to delete "
                "through them; unmount them (a build process may have leaked)"
            )

    def state(self) -> VolumeState:
        return VolumeState.ATTACHED if self.path.is_dir() else VolumeState.ABSENT
