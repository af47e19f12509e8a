"""A minimal writer of the cpio "newc" format the kernel unpacks as initramfs.

Written here rather than by `cpio -o` so that the archive needs no root (device nodes are
just headers), is deterministic (fixed owners, inode numbers, order), and needs no staging
of symlinks and nodes on the host filesystem.
"""

from __future__ import annotations

import stat
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

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)
