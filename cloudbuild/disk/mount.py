"""Mounting the root volume on the worker host (only volumes *we* formatted: never a guest-written one)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from cloudbuild.disk.image import is_block_device
from cloudbuild.errors import InfraError
from cloudbuild.log import get_logger
from cloudbuild.runner import CommandError, run

log = get_logger(__name__)


@contextlib.contextmanager
def mounted(device: Path, mountpoint: Path, *, fstype: str, options: str = "") -> Iterator[Path]:
    """Mount an image file (through a loop device) or a block device; always unmount afterwards."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    opts = [o for o in options.split(",") if o]
    if not is_block_device(device):
        opts.append("loop")
    argv = ["mount", "-t", fstype]
    if opts:
        argv += ["-o", ",".join(opts)]
    try:
        run([*argv, device, mountpoint], timeout=120)
    except CommandError as exc:
        raise InfraError(f"cannot mount {device} on {mountpoint}: {exc}") from exc
    try:
        yield mountpoint
    finally:
        # must work, or the filesystem handed to the build machine is corrupt
        try:
            run(["umount", mountpoint], timeout=300)
        except CommandError as exc:
            log.error("umount failed, trying a lazy unmount", error=str(exc))
            run(["umount", "-l", mountpoint], timeout=60, check=False)
            raise InfraError(f"cannot unmount {mountpoint}: {exc}") from exc
