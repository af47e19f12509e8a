"""A minimal writer of the cpio "newc" format the kernel unpacks as initramfs.

Written here rather than by `cpio -o` so that the archive needs no root (device nodes are
just headers), is deterministic (fixed owners, inode numbers, order), and needs no staging
of symlinks and nodes on the host filesystem.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO


class CpioWriter:
    def __init__(self, out: BinaryIO, *, mtime: int = 0):
        self.out = out
        self.mtime = mtime
        self.inode = 1000
        self.names: set[str] = set()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        *,
        rdev: tuple[int, int] = (0, 0),
        mtime: int | None = None,
    ) -> None:
        name = name.lstrip("/")
        if not name or name in self.names:
            return
        self.names.add(name)
        self.inode += 1
        encoded = name.encode() + b"\0"
        fields = (
            self.inode,
            mode,
            0,  # uid
            0,  # gid
            1,  # nlink
            self.mtime if mtime is None else mtime,
            len(data),
            0,  # dev major
            0,  # dev minor
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check
        )
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self.out.write(header + encoded)
        self.out.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-len(data) % 4))

    def directory(self, name: str, mode: int = 0o755) -> None:
        parts = name.strip("/").split("/")
        for depth in range(1, len(parts) + 1):
            self._entry("/".join(parts[:depth]), stat.S_IFDIR | mode)

    def _parents(self, name: str) -> None:
        parent = name.strip("/").rpartition("/")[0]
        if parent:
            self.directory(parent)

    def file(self, name: str, data: bytes, mode: int = 0o644, *, mtime: int | None = None) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFREG | mode, data, mtime=mtime)

    def symlink(self, name: str, target: str) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def entry(self, entry: Entry) -> None:
        """Copy an entry read by `read_entries` (under its possibly changed name)."""
        self._parents(entry.name)
        self._entry(entry.name, entry.mode, entry.data, rdev=entry.rdev, mtime=entry.mtime)

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)


@dataclass(frozen=True)
class Entry:
    name: str
    mode: int
    data: bytes
    rdev: tuple[int, int] = (0, 0)
    mtime: int = 0


def read_entries(archive: bytes) -> Iterator[Entry]:
    """The entries of a newc archive up to its trailer (ours, or the first of a given initrd)."""
    pos = 0
    while pos + 110 <= len(archive) and archive[pos : pos + 6] in (b"070701", b"070702"):
        fields = [int(archive[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, mtime, size, rmajor, rminor, namesize = (
            fields[1], fields[5], fields[6], fields[9], fields[10], fields[11],
        )  # fmt: skip
        name_end = pos + 110 + namesize
        name = archive[pos + 110 : name_end - 1].decode("utf-8", "surrogateescape")
        start = name_end + (-name_end % 4)
        if name == "TRAILER!!!":
            return
        yield Entry(name, mode, archive[start : start + size], (rmajor, rminor), mtime)
        pos = start + size + (-(start + size) % 4)
