"""The blocklist manifest: obs-build's result-channel format, its bounded strict parser and its line writer.

The guest writes the manifest (`cloudbuild.disk.blocklist`), the host reads it
(`cloudbuild.disk.extract`); both import this module, so it is STDLIB ONLY (the guest agent
imports it inside the build machine).

Syntax (obs-build's `computeblocklists` / `extractbuild` since 2026-01, commits 09e6b8c9 and
2d25532c; docs/results.md has the full story)::

    d NAME MTIME                              a directory
    l NAME MTIME TARGET                       a symlink
    f NAME MTIME 0                            an empty file
    f NAME MTIME SIZE BLKSIZE EXTENT...       a file: SIZE bytes made of the extents, in order
    <empty line>                              end of the manifest

EXTENT is ``START[:OFF][-END[:OFF]]``: disk blocks of BLKSIZE bytes plus byte offsets, both ends
inclusive (a missing start offset is 0, a missing end is the start block, a missing end offset is
BLKSIZE-1). A run that starts at disk byte 0 is a hole. NAME and TARGET escape the bytes
0x00-0x1f, space and ``%`` as ``%XX`` (upper-case hex).

Two dialects, chosen by the reader, never guessed from the manifest: `obs` (the lines above,
today's obs-build) and `obs-2018` (the same lines without MTIME: obs-build 2018 to 2025, e.g.
Debian's 2021 package).

cloudbuild extensions, *trailers* after the terminating empty line (every extractbuild stops
there and never sees them): a sequence of trailers, each a marker line, its ``NAME VALUE`` lines
and an empty line. ``%modes`` (``NAME MODE``, files and directories; MODE is four octal digits,
only the ``0777`` bits are used) in both dialects; ``%mtimes`` (``NAME MTIME``, any entry) only in
`obs-2018`, whose lines carry no mtime (the writer puts it before ``%modes``). Each trailer at most
once, each name at most once per trailer.

The parser is strict: it accepts exactly what the writers produce (canonical numbers and escapes,
single spaces, no raw control bytes) and refuses anything else with `UntrustedData`, within fixed
bounds on line length, manifest size, entry count and path shape.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal

from cloudbuild.errors import UntrustedData

MIB = 1024 * 1024

Dialect = Literal["obs", "obs-2018"]
"""How to read a manifest: `obs` (today's lines with inline mtimes, optional ``%modes`` trailer; the
default) or `obs-2018` (lines without mtimes, optional ``%mtimes`` and ``%modes`` trailers)."""

WriteFormat = Literal["obs", "obs+modes", "obs-2018", "obs-2018+meta", "obs-2018+mtimes"]
"""What to write: `obs` (byte-identical to today's computeblocklists), `obs+modes` (those lines,
the terminating empty line and the ``%modes`` trailer: the default; today's extractbuild reads it),
`obs-2018` (byte-identical to the 2018..2025 computeblocklists), `obs-2018+meta` (those lines, the
``%mtimes`` and the ``%modes`` trailer: the 2018 extractbuild reads it), `obs-2018+mtimes` (those
lines and the ``%mtimes`` trailer only)."""

WRITE_FORMATS: tuple[WriteFormat, ...] = ("obs", "obs+modes", "obs-2018", "obs-2018+meta", "obs-2018+mtimes")
DEFAULT_WRITE_FORMAT: WriteFormat = "obs+modes"
DIALECTS: tuple[Dialect, ...] = ("obs", "obs-2018")
DEFAULT_DIALECT: Dialect = "obs"

TRAILER_MTIMES = b"%mtimes"
TRAILER_MODES = b"%modes"
TRAILERS = (TRAILER_MTIMES, TRAILER_MODES)

MIN_BLKSIZE = 512
MAX_BLKSIZE = 65536
MAX_NUMBER = (1 << 63) - 1
MAX_MTIME = 10**11 - 1  # year 5138: far enough, small enough for every utime()
PERMISSIONS = 0o777  # the mode bits restored: never setuid, setgid or sticky
NAME_MAX = 255
PATH_MAX = 4095


@dataclass(frozen=True)
class Limits:
    """Bounds on what a manifest may make the host do (all of them hostile-guest controlled)."""

    max_line: int = 16 * MIB  # a 4 GiB file in 4 KiB fragments is ~8 MiB of extents
    max_manifest: int = 256 * MIB  # bytes read from the manifest source, trailer included
    max_entries: int = 1_000_000
    max_depth: int = 128  # path components per name


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Dir:
    name: bytes
    mtime: int | None = None


@dataclass(frozen=True)
class Symlink:
    name: bytes
    target: bytes
    mtime: int | None = None


@dataclass(frozen=True)
class Run:
    """`length` bytes of a file: read at disk byte `offset`, or a hole when `offset` is None."""

    offset: int | None
    length: int


@dataclass(frozen=True)
class File:
    name: bytes
    size: int
    blksize: int
    extents: bytes  # the raw EXTENT tokens, parsed lazily by runs() so memory stays bounded
    mtime: int | None = None

    def runs(self, *, disk_size: int) -> Iterator[Run]:
        """The file's byte runs in order, adjacent ones coalesced; refuses anything not exactly
        accounted for or outside `disk_size`."""
        return _runs(self, disk_size)


@dataclass(frozen=True)
class Mtime:
    """From the mtime trailer: set `name`'s modification time once everything exists."""

    name: bytes
    mtime: int


@dataclass(frozen=True)
class Mode:
    """From the mode trailer: give the file or directory `name` the permission bits `mode`.

    `mode` is already masked to PERMISSIONS (a claimed setuid/setgid/sticky bit is dropped);
    `directory` tells a directory (mode applied at the very end, deepest first) from a file.
    """

    name: bytes
    mode: int
    directory: bool


Entry = Dir | Symlink | File | Mtime | Mode


# ---------------------------------------------------------------------------------------------
# escaping and path rules, shared by both sides

_ESCAPED = frozenset([*range(0x20), 0x20, 0x25])
_ESCAPE_TABLE = {b: b"%%%02X" % b for b in _ESCAPED}
_NEEDS_ESCAPE = re.compile(rb"[\x00-\x20%]")
_HEX_UPPER = b"0123456789ABCDEF"


def escape(raw: bytes) -> bytes:
    """obs-build's escaping: bytes 0x00-0x1f, space and % as %XX."""
    return _NEEDS_ESCAPE.sub(lambda m: _ESCAPE_TABLE[m.group()[0]], raw)


def unescape(field: bytes, what: str) -> bytes:
    """Strict inverse of `escape`: only %XX (upper-case hex) of a byte that `escape` escapes."""
    if b"%" not in field:
        return field
    out = bytearray()
    i = 0
    while True:
        j = field.find(b"%", i)
        if j < 0:
            out += field[i:]
            return bytes(out)
        out += field[i:j]
        pair = field[j + 1 : j + 3]
        if len(pair) != 2 or pair[0] not in _HEX_UPPER or pair[1] not in _HEX_UPPER:
            raise UntrustedData(f"manifest: bad escape in {what} {_show(field)}")
        byte = int(pair, 16)
        if byte not in _ESCAPED:
            raise UntrustedData(f"manifest: needless escape %{byte:02X} in {what} {_show(field)}")
        out.append(byte)
        i = j + 3


def _show(raw: bytes, limit: int = 80) -> str:
    text = raw[:limit].decode("utf-8", "backslashreplace")
    return repr(text + ("..." if len(raw) > limit else ""))


def name_problem(name: bytes, *, max_depth: int = DEFAULT_LIMITS.max_depth) -> str | None:
    """Why `name` may not be a manifest entry (None if it may): extractbuild's rules (no empty,
    `.` or `..` component, so nothing absolute) plus NUL, length and depth bounds."""
    if not name:
        return "empty name"
    if b"\0" in name:
        return "name contains NUL"
    if len(name) > PATH_MAX:
        return "name too long"
    # substring tests instead of split(): this runs for every name on both sides
    if (
        name[0] == 0x2F
        or name[-1] == 0x2F
        or b"//" in name
        or name in (b".", b"..")
        or name.startswith((b"./", b"../"))
        or name.endswith((b"/.", b"/.."))
        or b"/./" in name
        or b"/../" in name
    ):
        return "absolute name or empty, '.' or '..' component"
    if name.count(b"/") >= max_depth:
        return "name nested too deep"
    if len(name) > NAME_MAX and any(len(part) > NAME_MAX for part in name.split(b"/")):
        return "name component too long"
    return None


def symlink_problem(name: bytes, target: bytes) -> str | None:
    """Why the symlink `name` -> `target` is refused (None if fine): extractbuild's rules. No
    absolute target, no empty or `.` component, `..` only as a leading run no longer than the
    link's depth in the tree (so the target stays inside the tree)."""
    if not target:
        return "empty symlink target"
    if b"\0" in target:
        return "symlink target contains NUL"
    if len(target) > PATH_MAX:
        return "symlink target too long"
    parts = target.split(b"/")
    if any(part in (b"", b".") for part in parts):
        return "absolute symlink target or empty or '.' component"
    ups = 0
    while ups < len(parts) and parts[ups] == b"..":
        ups += 1
    if b".." in parts[ups:]:
        return "'..' in the middle of a symlink target"
    if ups > name.count(b"/"):
        return "symlink target escapes the tree"
    return None


# ---------------------------------------------------------------------------------------------
# the line writer (used by the guest-side blocklist writer)


def extent_token(start: int, end: int, blksize: int, *, islast: bool = False) -> bytes:
    """One EXTENT for disk bytes `start`..`end` inclusive (start 0: a hole of end+1 bytes), written
    exactly as computeblocklists does; `islast` rounds the end up to its block's last byte."""
    if start > end or start < 0:
        raise ValueError(f"bad extent {start}-{end}")
    startblk, startoff = divmod(start, blksize)
    endblk, endoff = divmod(end, blksize)
    if islast:
        endoff = blksize - 1
    token = b"%d" % startblk
    if startoff:
        token += b":%d" % startoff
    if startblk != endblk or endoff != blksize - 1:
        token += b"-%d" % endblk
        if endoff != blksize - 1:
            token += b":%d" % endoff
    return token


def inline_mtimes(fmt: WriteFormat) -> bool:
    """Whether `fmt`'s lines carry the mtime (today's form) or not (the 2018 form)."""
    return not fmt.startswith("obs-2018")


def ending(
    fmt: WriteFormat, mtimes: Iterable[tuple[bytes, int]], modes: Iterable[tuple[bytes, int]]
) -> bytes:
    """What follows `fmt`'s entry lines: nothing (`obs`, `obs-2018`: as computeblocklists, the
    pad terminates), else the terminating empty line and the format's trailers."""
    if fmt in ("obs", "obs-2018"):
        return b""
    if fmt == "obs+modes":
        return b"\n" + mode_trailer(modes)
    if fmt == "obs-2018+mtimes":
        return b"\n" + mtime_trailer(mtimes)
    return b"\n" + mtime_trailer(mtimes) + mode_trailer(modes)


def dir_line(name: bytes, *, mtime: int | None = None) -> bytes:
    if mtime is None:
        return b"d %s\n" % escape(name)
    return b"d %s %d\n" % (escape(name), mtime)


def symlink_line(name: bytes, target: bytes, *, mtime: int | None = None) -> bytes:
    if mtime is None:
        return b"l %s %s\n" % (escape(name), escape(target))
    return b"l %s %d %s\n" % (escape(name), mtime, escape(target))


def file_line(
    name: bytes, size: int, blksize: int, extents: Iterable[bytes], *, mtime: int | None = None
) -> bytes:
    head = b"f %s" % escape(name) if mtime is None else b"f %s %d" % (escape(name), mtime)
    if size == 0:
        return head + b" 0\n"
    return b"%s %d %d %s\n" % (head, size, blksize, b" ".join(extents))


def mtime_trailer(mtimes: Iterable[tuple[bytes, int]]) -> bytes:
    """The mtime trailer written after the terminating empty line (2018 form only)."""
    lines = [TRAILER_MTIMES + b"\n"]
    lines.extend(b"%s %d\n" % (escape(name), mtime) for name, mtime in mtimes)
    lines.append(b"\n")
    return b"".join(lines)


def mode_trailer(modes: Iterable[tuple[bytes, int]]) -> bytes:
    """The mode trailer: files and directories only, the PERMISSIONS bits as four octal digits
    (e.g. ``0755``). Written after the mtime trailer, if any."""
    lines = [TRAILER_MODES + b"\n"]
    lines.extend(b"%s %04o\n" % (escape(name), mode & PERMISSIONS) for name, mode in modes)
    lines.append(b"\n")
    return b"".join(lines)


# ---------------------------------------------------------------------------------------------
# the parser (host side)

_NUMBER = re.compile(rb"0|[1-9][0-9]{0,18}")
_EXTENT = re.compile(
    rb"(0|[1-9][0-9]{0,18})(?::(0|[1-9][0-9]{0,18}))?(?:-(0|[1-9][0-9]{0,18})(?::(0|[1-9][0-9]{0,18}))?)?"
)
_RAW_CONTROL = re.compile(rb"[\x00-\x1f]")
_MODE = re.compile(rb"[0-7]{4}")
_OCTAL = re.compile(rb"[0-7]{1,24}")


def _number(token: bytes, what: str, maximum: int = MAX_NUMBER) -> int:
    if not _NUMBER.fullmatch(token):
        raise UntrustedData(f"manifest: bad {what} {_show(token)}")
    value = int(token)
    if value > maximum:
        raise UntrustedData(f"manifest: {what} {value} out of range")
    return value


def _mode(token: bytes) -> int:
    """Four octal digits 0000..7777, masked to PERMISSIONS."""
    if not _MODE.fullmatch(token):
        if _OCTAL.fullmatch(token) and int(token, 8) > 0o7777:
            raise UntrustedData(f"manifest: mode {_show(token)} out of range (0000..7777)")
        raise UntrustedData(f"manifest: bad mode {_show(token)} (four octal digits)")
    return int(token, 8) & PERMISSIONS


class _Reader:
    """Line reader with the manifest's bounds: no line longer than max_line, no more than
    max_manifest bytes in all."""

    def __init__(self, stream: BinaryIO, limits: Limits) -> None:
        self._stream = stream
        self._limits = limits
        self.consumed = 0
        self.lineno = 0

    def marker(self, known: tuple[bytes, ...]) -> bytes | None:
        """The next line if it is one of the `known` marker lines (consumed), else None; never
        fails on what is there (the pad, old swap contents: at most one short line is read)."""
        budget = min(max(len(m) for m in known) + 1, self._limits.max_manifest - self.consumed)
        if budget <= 0:
            return None
        raw = self._stream.readline(budget)
        self.consumed += len(raw)
        if not raw.endswith(b"\n") or raw[:-1] not in known:
            return None
        self.lineno += 1
        return raw[:-1]

    def line(self) -> bytes | None:
        """The next line without its newline; None at end of input (only after a complete line)."""
        budget = min(self._limits.max_line + 1, self._limits.max_manifest - self.consumed + 1)
        raw = self._stream.readline(budget)
        if not raw:
            return None
        self.consumed += len(raw)
        self.lineno += 1
        if self.consumed > self._limits.max_manifest:
            raise UntrustedData(f"manifest: longer than {self._limits.max_manifest} bytes")
        if not raw.endswith(b"\n"):
            if len(raw) > self._limits.max_line:
                raise UntrustedData(f"manifest: line {self.lineno} longer than {self._limits.max_line} bytes")
            raise UntrustedData(f"manifest: line {self.lineno} is truncated (no newline at end of input)")
        return raw[:-1]


def parse(
    stream: BinaryIO, *, dialect: Dialect = DEFAULT_DIALECT, limits: Limits = DEFAULT_LIMITS
) -> Iterator[Entry]:
    """Entries of the manifest read from `stream` (positioned after the status pad), in order,
    checked as they come; raises UntrustedData at the first problem. `dialect` is the reader's
    choice: nothing in the manifest changes how its lines are split.

    Guarantees for every entry yielded: the name passes `name_problem`, is not a duplicate, and
    its parent is a `Dir` yielded before; symlink targets pass `symlink_problem`; a File's
    runs() add up to exactly its size; in the `obs` dialect every Dir, Symlink and File has its
    mtime. Mtime and Mode entries (trailers) come after all other entries and name an entry
    yielded before, once each per trailer; a Mode names a File or Dir (`directory` says which),
    never a Symlink, and its mode has no bit beyond PERMISSIONS.
    """
    if dialect not in DIALECTS:
        raise ValueError(f"unknown manifest dialect {dialect!r}")
    reader = _Reader(stream, limits)
    kinds: dict[bytes, str] = {}
    inline = dialect == "obs"
    line = reader.line()
    while line:  # None (end of input) or b"" (terminator) end the entries
        if len(kinds) >= limits.max_entries:
            raise UntrustedData(f"manifest: more than {limits.max_entries} entries")
        entry = _entry(line, inline=inline, kinds=kinds, limits=limits, lineno=reader.lineno)
        kinds[entry.name] = type(entry).__name__
        yield entry
        line = reader.line()
    if line is None:
        return
    # trailers may follow the terminator, each right after the previous one's empty line;
    # anything else there is the pad or old swap contents and is never parsed
    trailers: set[bytes] = set()
    while True:
        marker = reader.marker(TRAILERS)
        if marker is None:
            return
        if marker in trailers:
            raise UntrustedData(f"manifest: line {reader.lineno}: second {marker.decode()} trailer")
        if inline and marker == TRAILER_MTIMES:
            raise UntrustedData(
                f"manifest: line {reader.lineno}: a %mtimes trailer in the obs dialect (its lines carry "
                "the mtimes; a 2018-form manifest needs --manifest-format obs-2018)"
            )
        trailers.add(marker)
        yield from _trailer(reader, marker, kinds)


def _trailer(reader: _Reader, marker: bytes, kinds: dict[bytes, str]) -> Iterator[Mtime | Mode]:
    what = "mtime" if marker == TRAILER_MTIMES else "mode"
    seen: set[bytes] = set()
    while True:
        line = reader.line()
        if line is None:
            raise UntrustedData(f"manifest: {what} trailer without its terminating empty line")
        if not line:
            return
        if len(seen) >= len(kinds):
            raise UntrustedData(f"manifest: line {reader.lineno}: more {what} lines than entries")
        fields = _fields(line, reader.lineno)
        if len(fields) != 2:
            raise UntrustedData(f"manifest: line {reader.lineno}: bad {what} trailer line")
        name = unescape(fields[0], "name")
        kind = kinds.get(name)
        if kind is None:
            raise UntrustedData(f"manifest: {what} for unknown entry {_show(name)}")
        if name in seen:
            raise UntrustedData(f"manifest: second {what} for {_show(name)}")
        seen.add(name)
        if marker == TRAILER_MTIMES:
            yield Mtime(name, _number(fields[1], "mtime", MAX_MTIME))
        elif kind == "Symlink":
            raise UntrustedData(f"manifest: mode for the symlink {_show(name)} (symlinks have no mode)")
        else:
            yield Mode(name, _mode(fields[1]), kind == "Dir")


def _fields(line: bytes, lineno: int, maxsplit: int = -1) -> list[bytes]:
    if _RAW_CONTROL.search(line):
        raise UntrustedData(f"manifest: line {lineno} contains a raw control byte")
    fields = line.split(b" ", maxsplit)
    if any(not field for field in fields):
        raise UntrustedData(f"manifest: line {lineno}: empty field (leading, trailing or double space)")
    return fields


def _entry(line: bytes, *, inline: bool, kinds: dict[bytes, str], limits: Limits, lineno: int) -> Entry:
    # split off at most the fixed fields; a file's extents stay one bytes object, parsed lazily
    fixed = 5 if inline else 4
    fields = _fields(line, lineno, fixed)
    kind = fields[0]
    if kind not in (b"d", b"l", b"f") or len(fields) < 2:
        raise UntrustedData(f"manifest: line {lineno}: unknown entry {_show(line)}")
    name = unescape(fields[1], "name")
    problem = name_problem(name, max_depth=limits.max_depth)
    if problem:
        raise UntrustedData(f"manifest: line {lineno}: {problem}: {_show(name)}")
    if name in kinds:
        raise UntrustedData(f"manifest: line {lineno}: duplicate entry {_show(name)}")
    parent, slash, _ = name.rpartition(b"/")
    if slash and kinds.get(parent) != "Dir":
        raise UntrustedData(
            f"manifest: line {lineno}: {_show(name)} is not inside a directory listed before it"
        )
    rest = fields[2:]
    mtime = None
    if inline:
        if not rest:
            raise UntrustedData(f"manifest: line {lineno}: missing mtime")
        mtime = _number(rest.pop(0), "mtime", MAX_MTIME)
    if kind == b"d":
        if rest:
            raise UntrustedData(f"manifest: line {lineno}: extra fields after a directory")
        return Dir(name, mtime)
    if kind == b"l":
        if len(rest) != 1:
            raise UntrustedData(f"manifest: line {lineno}: a symlink needs exactly one target")
        target = unescape(rest[0], "symlink target")
        problem = symlink_problem(name, target)
        if problem:
            raise UntrustedData(f"manifest: line {lineno}: {_show(name)}: {problem}: {_show(target)}")
        return Symlink(name, target, mtime)
    if not rest:
        raise UntrustedData(f"manifest: line {lineno}: a file needs a size")
    size = _number(rest[0], "size")
    if size == 0:
        if len(rest) != 1:
            raise UntrustedData(f"manifest: line {lineno}: an empty file has no extents")
        return File(name, 0, 0, b"", mtime)
    if len(rest) < 3:
        raise UntrustedData(f"manifest: line {lineno}: a file of {size} bytes needs a block size and extents")
    blksize = _number(rest[1], "block size", MAX_BLKSIZE)
    if blksize < MIN_BLKSIZE or blksize & (blksize - 1):
        raise UntrustedData(
            f"manifest: line {lineno}: block size {blksize} is not a power of two in 512..65536"
        )
    extents = rest[2]
    if extents.startswith(b" ") or extents.endswith(b" ") or b"  " in extents:
        raise UntrustedData(f"manifest: line {lineno}: empty field (leading, trailing or double space)")
    return File(name, size, blksize, extents, mtime)


def _runs(entry: File, disk_size: int) -> Iterator[Run]:
    bs = entry.blksize
    left = entry.size
    pending: Run | None = None
    for match in re.finditer(rb"[^ ]+", entry.extents):
        token = match.group()
        m = _EXTENT.fullmatch(token)
        if not m:
            raise UntrustedData(f"manifest: {_show(entry.name)}: bad extent {_show(token)}")
        startblk = int(m.group(1))
        startoff = int(m.group(2) or 0)
        endblk = int(m.group(3)) if m.group(3) is not None else startblk
        endoff = int(m.group(4)) if m.group(4) is not None else bs - 1
        if startoff >= bs or endoff >= bs:
            raise UntrustedData(
                f"manifest: {_show(entry.name)}: extent offset beyond its block {_show(token)}"
            )
        start = startblk * bs + startoff
        length = endblk * bs + endoff + 1 - start
        if length <= 0:
            raise UntrustedData(f"manifest: {_show(entry.name)}: extent ends before it starts {_show(token)}")
        if left <= 0:
            raise UntrustedData(f"manifest: {_show(entry.name)}: extent beyond the file size {_show(token)}")
        length = min(length, left)  # like extractbuild: the last extent may overshoot the size
        left -= length
        if start == 0:
            run = Run(None, length)
        else:
            if start + length > disk_size:
                raise UntrustedData(
                    f"manifest: {_show(entry.name)}: extent {_show(token)} is outside the disk ({disk_size} bytes)"
                )
            run = Run(start, length)
        if pending is None:
            pending = run
        elif pending.offset is None and run.offset is None:
            pending = Run(None, pending.length + run.length)
        elif (
            pending.offset is not None
            and run.offset is not None
            and pending.offset + pending.length == run.offset
        ):
            pending = Run(pending.offset, pending.length + run.length)
        else:
            yield pending
            pending = run
    if left != 0:
        raise UntrustedData(
            f"manifest: {_show(entry.name)}: extents cover {entry.size - left} of {entry.size} bytes"
        )
    if pending is not None:
        yield pending
