"""`cloudbuild blocklist`: the guest side of the result channel (obs-build's computeblocklists).

Turns a list of result paths into a manifest of their on-disk extents (FIEMAP, FIBMAP as the
fallback), which the guest writes onto the swap disk and the host reads with
`cloudbuild.disk.extract`. See `cloudbuild.disk.manifest` for the format and docs/results.md.

STDLIB ONLY: the guest agent imports this inside the build machine. Warnings go to stderr.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from cloudbuild.disk import manifest
from cloudbuild.disk.manifest import WriteFormat

FIBMAP = 1
FIGETBSZ = 2
FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)

FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_UNWRITTEN = 0x800
# UNKNOWN | DELALLOC | DATA_ENCRYPTED | NOT_ALIGNED | DATA_INLINE | DATA_TAIL: no disk address to read
FIEMAP_EXTENT_UNMAPPABLE = 0x2 | 0x4 | 0x80 | 0x100 | 0x200 | 0x400

_FIEMAP_HEAD = struct.Struct(
    "=QQIIII"
)  # fm_start fm_length fm_flags fm_mapped_extents fm_extent_count fm_reserved
_FIEMAP_EXTENT = struct.Struct(
    "=QQQQQIIII"
)  # fe_logical fe_physical fe_length reserved64[2] fe_flags reserved[3]
_EXTENTS_PER_CALL = 64


class BlocklistError(Exception):
    """A result file cannot be block-mapped (the manifest cannot describe it)."""


def _alt_ioctl(nr: int) -> int:
    # powerpc, mips, sparc and alpha have 3 direction bits and _IOC_NONE = 1
    size = (nr >> 16) & 0x3FFF
    direction = nr >> 30
    if size > (1 << 13):
        raise ValueError(f"bad ioctl size {size}")
    return (nr & 0x1FFFFFFF) | ((direction + 1) << 29)


def _ioctl(fd: int, nr: int, arg: bytearray) -> None:
    try:
        fcntl.ioctl(fd, nr, arg, True)
    except OSError:
        fcntl.ioctl(fd, _alt_ioctl(nr), arg, True)


def block_size(fd: int) -> int:
    """The filesystem block size of the open file `fd` (FIGETBSZ)."""
    buf = bytearray(struct.pack("=i", 0))
    _ioctl(fd, FIGETBSZ, buf)
    (bsize,) = struct.unpack("=i", buf)
    if bsize <= 0:
        raise BlocklistError(f"illegal block size {bsize}")
    return int(bsize)


def fiemap_extents(fd: int, size: int, bsize: int) -> list[bytes]:
    """EXTENT tokens from FIEMAP, exactly as computeblocklists writes them: unwritten
    (fallocated) extents and gaps become holes, a trailing hole covers up to `size`."""
    tokens: list[bytes] = []
    offset = 0
    buf = bytearray(_FIEMAP_HEAD.size + _FIEMAP_EXTENT.size * _EXTENTS_PER_CALL)
    while offset < size:
        _FIEMAP_HEAD.pack_into(buf, 0, offset, size, FIEMAP_FLAG_SYNC, 0, _EXTENTS_PER_CALL, 0)
        _ioctl(fd, FS_IOC_FIEMAP, buf)
        count = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
        if count == 0:
            break  # the rest is a hole
        last = False
        for i in range(count):
            logical, physical, length, _, _, flags, _, _, _ = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size
            )
            if logical >= size:
                raise BlocklistError("extent beyond the end of the file")
            if logical < offset:
                raise BlocklistError("extents going back in the file")
            if length <= 0:
                raise BlocklistError("extent with bad size")
            if offset < logical:
                tokens.append(manifest.extent_token(0, logical - offset - 1, bsize))
            islast = logical + length >= size
            if flags & FIEMAP_EXTENT_UNWRITTEN:
                # allocated but never written: reads back as zeros, so it is a hole
                tokens.append(manifest.extent_token(0, length - 1, bsize, islast=islast))
            elif flags & FIEMAP_EXTENT_ENCODED:
                raise BlocklistError("extent is mapped but encoded (compressed?)")
            elif flags & FIEMAP_EXTENT_UNMAPPABLE:
                raise BlocklistError(f"extent cannot be block-mapped (flags {flags:#x})")
            elif physical == 0:
                raise BlocklistError("extent at disk byte 0 would read as a hole")
            else:
                tokens.append(manifest.extent_token(physical, physical + length - 1, bsize, islast=islast))
            offset = logical + length
            last = bool(flags & FIEMAP_EXTENT_LAST)
        if last:
            break
    if offset < size:
        tokens.append(manifest.extent_token(0, size - offset - 1, bsize, islast=True))
    return tokens


def fibmap_extents(fd: int, size: int, bsize: int) -> list[bytes]:
    """EXTENT tokens from FIBMAP, block by block (needs CAP_SYS_RAWIO; the slow old way)."""
    tokens: list[bytes] = []
    blocks = (size + bsize - 1) // bsize
    first: int | None = None
    last = 0
    buf = bytearray(4)
    for index in range(blocks):
        struct.pack_into("=I", buf, 0, index)
        _ioctl(fd, FIBMAP, buf)
        (block,) = struct.unpack("=I", buf)
        if first is not None and block == (last + 1 if first else 0):
            last += 1  # continue the run (a hole run counts its blocks from 0)
            continue
        if first is not None and first != last:
            tokens[-1] += b"-%d" % last
        tokens.append(b"%d" % block)
        first = last = block
    if first is not None and first != last:
        tokens[-1] += b"-%d" % last
    return tokens


def file_extents(fd: int, size: int, bsize: int, *, use_fibmap: bool = False) -> list[bytes]:
    """FIEMAP, else FIBMAP (like computeblocklists)."""
    problems = []
    if not use_fibmap:
        try:
            return fiemap_extents(fd, size, bsize)
        except (OSError, BlocklistError) as exc:
            problems.append(f"fiemap: {exc}")
    try:
        return fibmap_extents(fd, size, bsize)
    except (OSError, BlocklistError) as exc:
        problems.append(f"fibmap: {exc}")
    raise BlocklistError("could not get the extent list (" + "; ".join(problems) + ")")


def _warn(message: str) -> None:
    sys.stderr.write(f"blocklist: {message}\n")


def _mtime(st: os.stat_result, name: bytes) -> int:
    if st.st_mtime_ns < 0:
        _warn(f"{_show(name)}: mtime before 1970, written as 0")
        return 0
    return min(st.st_mtime_ns // 1_000_000_000, manifest.MAX_MTIME)


def _show(name: bytes) -> str:
    return os.fsdecode(name)


@dataclass(frozen=True)
class _Skip:
    warning: str


_Line = tuple[bytes, bytes, int, int | None]  # line, name, mtime, mode (None: a symlink)
_Described = _Line | _Skip | None


class _Describer:
    """One manifest line per name. Names come in find's order, so the fd of the last parent
    directory is kept and every lookup is one component (path walks dominate the cost)."""

    def __init__(self, *, inline: bool, use_fibmap: bool, dir_fd: int | None) -> None:
        self.inline = inline
        self.use_fibmap = use_fibmap
        self.dir_fd = dir_fd
        self._parent = b""
        self._parent_fd: int | None = dir_fd
        self._bsize: dict[int, int] = {}  # st_dev -> FIGETBSZ: one ioctl per filesystem, not per file

    def close(self) -> None:
        if self._parent_fd is not None and self._parent_fd != self.dir_fd:
            os.close(self._parent_fd)
        self._parent, self._parent_fd = b"", self.dir_fd

    def _at(self, name: bytes) -> tuple[bytes, int | None]:
        """(last component, fd of its directory) for name."""
        parent, slash, base = name.rpartition(b"/")
        if not slash:
            if self._parent:
                self.close()
            return name, self.dir_fd
        if parent != self._parent:
            self.close()
            # O_NOFOLLOW on the last component only: like the plain path lookup it replaces
            self._parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.dir_fd)
            self._parent = parent
        return base, self._parent_fd

    def describe(self, name: bytes) -> _Described:
        if not name:
            return None  # an empty line in the list of names
        problem = manifest.name_problem(name)
        if problem:
            raise ValueError(f"{_show(name)}: {problem}")
        base, at = self._at(name)
        st = os.lstat(base, dir_fd=at)
        mtime = _mtime(st, name)
        line_mtime = mtime if self.inline else None
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            target = os.readlink(base, dir_fd=at)
            problem = manifest.symlink_problem(name, target)
            if problem:
                return _Skip(f"{_show(name)}: bad symlink ({_show(target)}): {problem}, ignored")
            return manifest.symlink_line(name, target, mtime=line_mtime), name, mtime, None
        if stat.S_ISDIR(mode):
            return manifest.dir_line(name, mtime=line_mtime), name, mtime, mode
        if not stat.S_ISREG(mode):
            return _Skip(f"{_show(name)}: unsupported file type, ignored")
        # O_NONBLOCK: had it become a fifo since the lstat, opening it must not hang
        fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=at)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return _Skip(f"{_show(name)}: unsupported file type, ignored")
            if st.st_size == 0:
                return manifest.file_line(name, 0, 0, (), mtime=line_mtime), name, mtime, st.st_mode
            bsize = self._bsize.get(st.st_dev)
            if bsize is None:
                bsize = self._bsize[st.st_dev] = block_size(fd)
            try:
                extents = file_extents(fd, st.st_size, bsize, use_fibmap=self.use_fibmap)
            except BlocklistError as exc:
                raise BlocklistError(f"{_show(name)}: {exc}") from None
            line = manifest.file_line(name, st.st_size, bsize, extents, mtime=line_mtime)
            return line, name, mtime, st.st_mode
        finally:
            os.close(fd)


def manifest_lines(
    paths: Iterable[bytes | str],
    *,
    fmt: WriteFormat = manifest.DEFAULT_WRITE_FORMAT,
    verbose: int = 0,
    use_fibmap: bool = False,
    dir_fd: int | None = None,
) -> Iterator[_Line]:
    """(line, name, mtime, st_mode) for each path that goes into the manifest, in the given order
    (st_mode is None for a symlink: it has no mode to restore).

    Paths are relative (like `find RPMS SRPMS OTHER`), to the current directory or `dir_fd`.
    A symlink whose target would leave the tree, or a special file, is skipped with a warning
    (as computeblocklists does); a name extractbuild would refuse raises ValueError; a file
    that cannot be block-mapped raises BlocklistError.

    Beyond computeblocklists, so that the manifest is always one the extractors accept: a name
    listed twice is written once (with a warning), and directories missing from the list
    (`find RPMS -type f`) are written before the first name inside them. For find's output of
    whole trees neither happens and the lines are computeblocklists' exactly.
    """
    describer = _Describer(inline=manifest.inline_mtimes(fmt), use_fibmap=use_fibmap, dir_fd=dir_fd)
    written: set[bytes] = set()
    dirs: set[bytes] = set()

    def emit(name: bytes) -> _Line | None:
        result = describer.describe(name)
        if result is None:
            return None
        if isinstance(result, _Skip):
            _warn(result.warning)
            return None
        written.add(name)
        if result[0].startswith(b"d "):
            dirs.add(name)
        if verbose:
            sys.stderr.write(f"{_show(name)}\n")
        return result

    try:
        for path in paths:
            name = os.fsencode(path)
            if name in written:
                _warn(f"{_show(name)}: listed twice, ignored")
                continue
            parent = name.rpartition(b"/")[0]
            missing: list[bytes] = []
            while parent and parent not in dirs:
                missing.append(parent)
                parent = parent.rpartition(b"/")[0]
            for ancestor in reversed(missing):
                result = None if ancestor in written else emit(ancestor)
                if ancestor not in dirs:
                    raise ValueError(
                        f"{_show(name)}: {_show(ancestor)} is not a directory that can be listed"
                    )
                if result is not None:
                    yield result
            result = emit(name)
            if result is not None:
                yield result
    finally:
        describer.close()


def write_manifest(
    paths: Iterable[bytes | str],
    out: BinaryIO,
    *,
    padstart: int = 0,
    padend: int = 0,
    verbose: int = 0,
    fmt: WriteFormat = manifest.DEFAULT_WRITE_FORMAT,
    use_fibmap: bool = False,
    dir_fd: int | None = None,
) -> int:
    """Write the manifest of `paths` to `out`: `padstart` newlines (room for the build status),
    the entries, what the format puts after them (`manifest.ending`: for the default `obs+modes`
    the terminating empty line and the mode trailer), `padend` newlines. Returns the number of
    entries. `obs` output is byte-identical to today's computeblocklists', `obs-2018` output to
    the 2018..2025 one's.

    Note that `padend` newlines already terminate the manifest (as in obs-build); with `padend=0`
    and format `obs` or `obs-2018`, nothing terminates it but the end of `out`.
    """
    if fmt not in manifest.WRITE_FORMATS:
        raise ValueError(f"unknown manifest format {fmt!r}")
    out.write(b"\n" * padstart)
    mtimes: list[tuple[bytes, int]] = []
    modes: list[tuple[bytes, int]] = []
    count = 0
    for line, name, mtime, mode in manifest_lines(
        paths, fmt=fmt, verbose=verbose, use_fibmap=use_fibmap, dir_fd=dir_fd
    ):
        out.write(line)
        mtimes.append((name, mtime))
        if mode is not None:
            modes.append((name, mode))
        count += 1
    out.write(manifest.ending(fmt, mtimes, modes))
    out.write(b"\n" * padend)
    return count
