"""Image files that back local volumes: create (fallocate, else sparse), delete, size."""

from __future__ import annotations

import os
from pathlib import Path

from cloudbuild.errors import InfraError
from cloudbuild.log import get_logger
from cloudbuild.runner import CommandError, run

log = get_logger(__name__)

MIB = 1024 * 1024


def create_image(path: Path, size_mib: int) -> None:
    """Create `path` of `size_mib` MiB: fallocate avoids fragmentation; a sparse file where it is unsupported."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("creating image", path=str(path), size_mib=size_mib)
    try:
        run(["fallocate", "-l", f"{size_mib}M", path])
        return
    except CommandError as exc:
        log.info("fallocate failed, creating a sparse file", error=str(exc))
    try:
        # obs-build's fallback: dd with count=0 seek=size only sets the length (a sparse file)
        run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", "count=0", f"seek={size_mib}"])
    except CommandError as exc:
        raise InfraError(f"cannot create image {path}: {exc}") from exc


def is_block_device(path: Path) -> bool:
    try:
        import stat

        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def zero_head(device: Path, length: int = 1024) -> None:
    """Overwrite the first `length` bytes (old status record / swap signature) without truncating."""
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\0" * length, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def device_size(device: Path) -> int:
    """Size in bytes of an image file or a block device."""
    fd = os.open(device, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
