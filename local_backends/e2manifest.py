"""The blocklist manifest of an ext2/3/4 image the guest wrote, made on the host in userspace (debugfs).

For an emulator that offers the guest no swap disk (obs-build's default emulator): the guest
leaves its results in /.build.out and its status in /.build/_exitcode of the root image, and the
host must read them without the host kernel ever mounting a filesystem the guest controlled
(obs-build mounts it, "WARNING: This is not safe against attacks"). Here:

- `debugfs` (e2fsprogs, read-only: no `-w`) lists directories by inode number (`ls -p <ino>`) and
  reports each inode (`stat <ino>`): type, size, mtime and the extent (or block) map. No path is
  resolved through the image except by inode numbers we took from the listings, nothing is
  written on the host;
- its output is parsed strictly (exact line shapes, bounded counts and sizes; anything else is
  `UntrustedData`), names with `/`, newlines or NUL are refused, symlinks whose target would
  leave the tree are skipped with a warning (as the guest-side writer does);
- the result is an ordinary manifest in the default format (today's obs-build lines with inline
  mtimes, then the mode trailer) that goes through the same strict parser and extractor as every
  other build's.

What this trusts: debugfs' parsing of a hostile image (a userspace process, no kernel code),
and that the image's extent maps are honest about *which* blocks hold a file: a lying map can
only make the extractor copy other blocks of the *same image* (the guest's own disk), never
host data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cloudbuild.disk import manifest
from cloudbuild.errors import UntrustedData
from cloudbuild.log import get_logger
from cloudbuild.runner import CommandError, run

log = get_logger(__name__)

ROOT_INODE = 2
MAX_ENTRIES = 100_000
MAX_DEPTH = 64
MAX_OUTPUT = 16 * 1024 * 1024
EXT4_INLINE_DATA_FL = 0x10000000
EXT4_ENCRYPT_FL = 0x800

_LS_LINE = re.compile(rb"/(\d{1,12})/([0-7]{6})/(\d{1,10})/(\d{1,10})/([^/\n\0]*)/(\d{0,20})/")
_TYPE = re.compile(rb"^Inode: (\d+) +Type: ([A-Za-z/ ]+?) +Mode: +([0-7]+) +Flags: (0x[0-9a-f]+)$", re.M)
_SIZE = re.compile(rb"^User: .* Size: (\d+)$", re.M)
_MTIME = re.compile(rb"^ *mtime: 0x([0-9a-f]{1,16})", re.M)
_FAST_LINK = re.compile(rb'^Fast link dest: "(.*)"$', re.M)
_RUN = re.compile(rb"\((\d+)(?:-(\d+))?\):(\d+)(?:-(\d+))?( \[uninit\])?")
_META = re.compile(rb"\((?:IND|DIND|TIND|ETB\d+)\):\d+(?:-\d+)?")


@dataclass(frozen=True)
class Inode:
    number: int
    kind: str  # "regular", "directory", "symlink", ...
    size: int
    flags: int
    mtime: int
    runs: tuple[tuple[int, int, int | None], ...]  # (logical block, count, physical block or None: hole)
    fast_link: bytes | None


class Debugfs:
    """Read-only questions to debugfs about one image."""

    def __init__(self, image: Path):
        self.image = image

    def ask(self, request: str) -> bytes:
        try:
            proc = run(["debugfs", "-R", request, self.image], text=False, timeout=120)
        except CommandError as exc:
            raise UntrustedData(f"debugfs cannot read {self.image}: {exc}") from exc
        out: bytes = proc.stdout
        if len(out) > MAX_OUTPUT:
            raise UntrustedData(f"debugfs: the answer to {request!r} is too large")
        return out

    def block_size(self) -> int:
        match = re.search(rb"^Block size: +(\d+)$", self.ask("stats"), re.M)
        if not match:
            raise UntrustedData(f"{self.image}: no ext2/3/4 superblock (debugfs stats)")
        size = int(match.group(1))
        if size < manifest.MIN_BLKSIZE or size > manifest.MAX_BLKSIZE:
            raise UntrustedData(f"{self.image}: block size {size}")
        return size

    def listing(self, inode: int) -> list[tuple[bytes, int, int]]:
        """(name, inode, mode) of a directory's entries, without . and .."""
        entries = []
        for line in self.ask(f"ls -p <{inode}>").splitlines():
            if not line.strip():
                continue
            match = _LS_LINE.fullmatch(line)
            if not match:
                raise UntrustedData(f"directory <{inode}>: unexpected entry {line[:80]!r}")
            name = match.group(5)
            if name in (b".", b".."):
                continue
            if not name or len(name) > manifest.NAME_MAX:
                raise UntrustedData(f"directory <{inode}>: bad name {name[:80]!r}")
            entries.append((name, int(match.group(1)), int(match.group(2), 8)))
        if len(entries) > MAX_ENTRIES:
            raise UntrustedData(f"directory <{inode}> has too many entries")
        return entries

    def inode(self, number: int) -> Inode:
        text = self.ask(f"stat <{number}>")
        head = _TYPE.search(text)
        size = _SIZE.search(text)
        if not head or not size or int(head.group(1)) != number:
            raise UntrustedData(f"inode <{number}>: unexpected debugfs stat output")
        mtime = _MTIME.search(text)
        fast = _FAST_LINK.search(text)
        return Inode(
            number=number,
            kind=head.group(2).decode(),
            size=int(size.group(1)),
            flags=int(head.group(4), 16),
            mtime=int(mtime.group(1), 16) if mtime else 0,
            runs=_runs(text, number),
            fast_link=fast.group(1) if fast else None,
        )


def _runs(text: bytes, number: int) -> tuple[tuple[int, int, int | None], ...]:
    marker = re.search(rb"^(EXTENTS|BLOCKS):\n", text, re.M)
    if marker is None:
        return ()
    body = text[marker.end() :].split(b"\n", 1)[0]
    runs: list[tuple[int, int, int | None]] = []
    for token in body.split(b", "):
        token = token.strip()
        if not token or _META.fullmatch(token) or token.startswith(b"TOTAL: "):
            continue
        match = _RUN.fullmatch(token)
        if not match:
            raise UntrustedData(f"inode <{number}>: unexpected block map entry {token[:60]!r}")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        pfirst, plast = int(match.group(3)), int(match.group(4) or match.group(3))
        if last < first or plast - pfirst != last - first:
            raise UntrustedData(f"inode <{number}>: inconsistent block run {token[:60]!r}")
        runs.append((first, last - first + 1, None if match.group(5) else pfirst))
    return tuple(sorted(runs))


def extent_tokens(inode: Inode, bsize: int) -> list[bytes]:
    """EXTENT tokens of a regular file, holes included, as the guest-side writer makes them."""
    if inode.flags & (EXT4_INLINE_DATA_FL | EXT4_ENCRYPT_FL):
        raise UntrustedData(f"inode <{inode.number}>: inline or encrypted data cannot be block-mapped")
    size = inode.size
    blocks = (size + bsize - 1) // bsize
    tokens: list[bytes] = []
    offset = 0  # in blocks
    for logical, count, physical in inode.runs:
        if logical >= blocks:
            continue  # preallocated beyond the end of the file
        if logical < offset:
            raise UntrustedData(f"inode <{inode.number}>: overlapping block runs")
        count = min(count, blocks - logical)
        if logical > offset:
            tokens.append(manifest.extent_token(0, (logical - offset) * bsize - 1, bsize))
        islast = logical + count >= blocks
        if physical is None:
            tokens.append(manifest.extent_token(0, count * bsize - 1, bsize, islast=islast))
        elif physical == 0:
            raise UntrustedData(f"inode <{inode.number}>: a block at disk byte 0")
        else:
            start = physical * bsize
            tokens.append(manifest.extent_token(start, start + count * bsize - 1, bsize, islast=islast))
        offset = logical + count
    if offset < blocks:
        tokens.append(manifest.extent_token(0, size - offset * bsize - 1, bsize, islast=True))
    return tokens


def _link_target(image: Path, inode: Inode, bsize: int) -> bytes:
    if inode.fast_link is not None:
        return inode.fast_link
    if inode.size > manifest.PATH_MAX or len(inode.runs) != 1 or inode.runs[0][2] is None:
        raise UntrustedData(f"symlink <{inode.number}>: unexpected block map")
    with open(image, "rb") as f:
        f.seek(inode.runs[0][2] * bsize)
        return f.read(inode.size)


def image_manifest(
    image: Path, *, top: bytes = b".build.out", names: tuple[bytes, ...] = (b"results", b"_statistics")
) -> bytes:
    """The manifest (the default format: inline-mtime lines, terminated, then the mode trailer) of
    `top/names...` in the image."""
    fs = Debugfs(image)
    bsize = fs.block_size()
    top_entry = [e for e in fs.listing(ROOT_INODE) if e[0] == top]
    if not top_entry or top_entry[0][2] & 0o170000 != 0o040000:
        raise UntrustedData(f"{image}: no /{top.decode()} folder")
    lines: list[bytes] = []
    modes: list[tuple[bytes, int]] = []
    count = 0
    # (name, inode, mode from the directory listing, depth)
    pending: list[tuple[bytes, int, int, int]] = [
        (name, ino, mode, 0) for name, ino, mode in fs.listing(top_entry[0][1]) if name in names
    ]
    pending.sort(reverse=True)
    while pending:
        rel, number, mode, depth = pending.pop()
        count += 1
        if count > MAX_ENTRIES or depth > MAX_DEPTH:
            raise UntrustedData(f"{image}: too many or too deeply nested results")
        problem = manifest.name_problem(rel)
        if problem:
            raise UntrustedData(f"{image}: result name {rel[:80]!r}: {problem}")
        inode = fs.inode(number)
        mtime = min(inode.mtime, manifest.MAX_MTIME)
        if inode.kind == "directory":
            lines.append(manifest.dir_line(rel, mtime=mtime))
            children = [(rel + b"/" + name, ino, m, depth + 1) for name, ino, m in fs.listing(number)]
            pending.extend(sorted(children, reverse=True))
        elif inode.kind == "regular":
            tokens = extent_tokens(inode, bsize) if inode.size else []
            lines.append(manifest.file_line(rel, inode.size, bsize, tokens, mtime=mtime))
        elif inode.kind == "symlink":
            target = _link_target(image, inode, bsize)
            problem = manifest.symlink_problem(rel, target)
            if problem:
                log.warning("result symlink skipped", name=rel.decode(errors="replace"), reason=problem)
                continue
            lines.append(manifest.symlink_line(rel, target, mtime=mtime))
            continue  # symlinks have no mode
        else:
            log.warning(
                "result skipped: unsupported file type", name=rel.decode(errors="replace"), kind=inode.kind
            )
            continue
        modes.append((rel, mode))
    return b"".join(lines) + manifest.ending(manifest.DEFAULT_WRITE_FORMAT, (), modes)


def read_exit_file(image: Path) -> int | None:
    """The status an obs-build style guest left in /.build/_exitcode, None when there is none."""
    fs = Debugfs(image)
    build = [e for e in fs.listing(ROOT_INODE) if e[0] == b".build"]
    if not build or build[0][2] & 0o170000 != 0o040000:
        return None
    entry = [e for e in fs.listing(build[0][1]) if e[0] == b"_exitcode"]
    if not entry or entry[0][2] & 0o170000 != 0o100000:
        return None
    text = fs.ask(f"cat <{entry[0][1]}>")[:16].strip()
    return int(text) if len(text) == 1 and text.isdigit() else None
