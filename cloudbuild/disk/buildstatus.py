"""The BUILDSTATUS record: `BUILDSTATUS<n>` in the first 12 bytes of the swap disk (obs-build's format).

The guest writes it as its last act; the host reads it after the machine stopped. It comes from
the guest, so the parser accepts exactly `BUILDSTATUS` followed by one digit and nothing else
that could be mistaken for one: anything else is "no status" (exit 3).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

RECORD_LENGTH = 12
_RECORD = re.compile(rb"BUILDSTATUS([0-9])")


def encode(status: int) -> bytes:
    if not 0 <= status <= 9:
        raise ValueError(f"a build status is one digit, not {status}")
    return b"BUILDSTATUS%d" % status


def parse(head: bytes) -> int | None:
    """The status in the first 12 bytes, or None when there is no valid record."""
    match = _RECORD.fullmatch(head[:RECORD_LENGTH])
    return int(match.group(1)) if match else None


def read(device: Path) -> int | None:
    fd = os.open(device, os.O_RDONLY)
    try:
        return parse(os.pread(fd, RECORD_LENGTH, 0))
    finally:
        os.close(fd)


def write(device: Path, status: int) -> None:
    """Write the record in place (used by the guest agent and by `cloudbuild kill`)."""
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, encode(status), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
