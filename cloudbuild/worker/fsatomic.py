"""Small atomic file operations the `dir://` queue and store are built from."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def _durable_temp(path: Path, data: bytes) -> Path:
    """`data` in a fresh temporary file beside `path`, fsynced: ready to be renamed or linked."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def write_atomic(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a temporary file beside it, fsync, rename over it."""
    tmp = _durable_temp(path, data)
    try:
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create `path` with `data` only if it does not exist, never visible half-written.

    The content is written to a temporary file first and then hard-linked into place: link(2)
    fails with EEXIST when the name exists, so of several racing writers exactly one wins.
    """
    tmp = _durable_temp(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def rename_no_replace(src: Path, dst: Path) -> bool:
    """rename(2) a folder unless `dst` exists; False when another process moved `src` first."""
    try:
        os.rename(src, dst)
    except FileNotFoundError:
        return False
    except OSError:  # ENOTEMPTY/EEXIST: dst is taken
        if dst.exists():
            return False
        raise
    return True


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
