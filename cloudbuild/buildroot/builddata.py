"""`/.build/build.data`: the variables the host hands to the build machine, in obs-build's format.

The host writes the file into the build root; the guest (an obs-build guest with `. build.data`,
or our agent with `read_build_data`) reads it. Format, as obs-build's `vm_first_stage` writes it:

    NAME='value'            one line per variable; a ' inside the value is written '\\''
    name=('a' 'b' 'c')      arrays (definesnstuff, repos): each element quoted, space separated

A value may contain newlines (they stay inside the quotes). A NUL byte cannot be part of a shell
variable, so it is refused.

The reader never runs a shell: the file crosses the host/guest boundary, so it parses exactly
the grammar above (and the double-quoted array elements obs-build's own `shellquote` writes:
`"..."` with `\\\\`, `\\$`, `\\"` and `` \\` `` escaped), with bounds on size and counts, and
raises ValueError naming the line for anything else.

STDLIB ONLY: the guest agent imports this module inside the build machine.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

Value = str | list[str]

# Every variable obs-build's vm_first_stage writes, in the order it writes them.
BUILD_DATA_VARIABLES: tuple[str, ...] = (
    "RECIPEFILE",
    "BUILD_JOBS",
    "BUILD_ARCH",
    "BUILD_RPMS",
    "BUILD_DIST",
    "RELEASE",
    "BUILD_DEBUG",
    "SIGNDUMMY",
    "DO_LINT",
    "DO_CHECKS",
    "NOROOTFORBUILD",
    "CREATE_BASELIBS",
    "REASON",
    "CHANGELOG",
    "INCARNATION",
    "DISTURL",
    "DO_INIT",
    "KIWI_PARAMETERS",
    "VM_SWAP",
    "VMDISK_MOUNT_OPTIONS",
    "PERSONALITY",
    "MYHOSTNAME",
    "definesnstuff",
    "repos",
    "VM_TYPE",
    "RUN_SHELL",
    "DO_STATISTICS",
    "TIME_PREINSTALL",
    "VM_WATCHDOG",
    "BUILDENGINE",
    "CCACHE",
    "ABUILD_TARGET",
)

ARRAY_VARIABLES: frozenset[str] = frozenset({"definesnstuff", "repos"})

# obs-build writes these two only when they are set (`test -n "$VM_SWAP" && echo ...`).
OPTIONAL_VARIABLES: frozenset[str] = frozenset({"VM_SWAP", "VMDISK_MOUNT_OPTIONS"})

# obs-build's own defaults (the `build` script's initial values); everything else is empty.
DEFAULTS: Mapping[str, str] = {
    "DO_INIT": "true",
    "DO_CHECKS": "true",
    "PERSONALITY": "0",
}

# Bounds of the reader (and so of the writer: whatever we write, we can read back).
MAX_BYTES = 1024 * 1024
MAX_VARIABLES = 1000
MAX_ARRAY_ITEMS = 10000

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ASSIGN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=")
_SQ = re.compile(r"'([^']*)'")  # a single-quoted segment: no escapes at all inside
_DQ_ESCAPES = {"\\": "\\", "$": "$", '"': '"', "`": "`"}


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"build.data: {name!r} is not a shell variable name")
    return name


def _check_value(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"build.data: {name}: values are str, not {type(value).__name__}")
    if "\0" in value:
        raise ValueError(f"build.data: {name} contains a NUL byte, which no shell variable can hold")
    return value


def quote(value: str) -> str:
    """`value` single-quoted for a POSIX shell, a ' written as '\\'' (obs-build's `${VAR//"'"/$Q}`)."""
    return "'" + value.replace("'", "'\\''") + "'"


def format_build_data(variables: Mapping[str, str | Sequence[str]]) -> str:
    """The text of build.data for `variables`, in the mapping's order (see `fill_defaults`).

    A str value becomes `NAME='value'`, any other sequence of str an array `name=('a' 'b')`.
    Raises ValueError for a bad name, a NUL byte, or a result the reader would refuse as too large.
    """
    if len(variables) > MAX_VARIABLES:
        raise ValueError(f"build.data: {len(variables)} variables, more than {MAX_VARIABLES}")
    lines: list[str] = []
    for name, value in variables.items():
        _check_name(name)
        if isinstance(value, str):
            lines.append(f"{name}={quote(_check_value(name, value))}\n")
            continue
        items = list(value)
        if len(items) > MAX_ARRAY_ITEMS:
            raise ValueError(f"build.data: {name} has {len(items)} elements, more than {MAX_ARRAY_ITEMS}")
        quoted = " ".join(quote(_check_value(name, item)) for item in items)
        lines.append(f"{name}=({quoted})\n")
    text = "".join(lines)
    if len(text.encode("utf-8", "surrogateescape")) > MAX_BYTES:
        raise ValueError(f"build.data: larger than {MAX_BYTES} bytes")
    return text


def write_build_data(path: str | os.PathLike[str], variables: Mapping[str, str | Sequence[str]]) -> None:
    """Write build.data (UTF-8; surrogate escapes stand for the raw bytes they came from)."""
    data = format_build_data(variables).encode("utf-8", "surrogateescape")
    Path(path).write_bytes(data)


def fill_defaults(variables: Mapping[str, str | Sequence[str]] | None = None) -> dict[str, Value]:
    """Every variable obs-build writes, in its order, with obs-build's defaults for those not given.

    MYHOSTNAME defaults to this host's name. VM_SWAP and VMDISK_MOUNT_OPTIONS are left out when
    empty, as obs-build does. Variables obs-build does not know are kept, after its own.

    VMDISK_MOUNT_OPTIONS is what the guest puts in `mount -n ${VMDISK_MOUNT_OPTIONS},remount,rw /`,
    so it must be resolved, e.g. "-o noatime" (obs-build writes it after vm_set_mount_options);
    the placeholder "__default" would break that mount and is refused.
    """
    given = dict(variables or {})
    result: dict[str, Value] = {}
    for name in BUILD_DATA_VARIABLES:
        if name in ARRAY_VARIABLES:
            value = given.pop(name, [])
            if isinstance(value, str):
                raise TypeError(f"build.data: {name} is an array, not a str")
            result[name] = [_check_value(name, item) for item in value]
            continue
        default = socket.gethostname() if name == "MYHOSTNAME" else DEFAULTS.get(name, "")
        scalar = given.pop(name, default)
        if not isinstance(scalar, str):
            raise TypeError(f"build.data: {name} is a str, not {type(scalar).__name__}")
        if name in OPTIONAL_VARIABLES and not scalar:
            continue
        if name == "VMDISK_MOUNT_OPTIONS" and scalar == "__default":
            raise ValueError(
                'build.data: VMDISK_MOUNT_OPTIONS must be resolved (e.g. "-o noatime"), not __default'
            )
        result[name] = _check_value(name, scalar)
    for name, value in given.items():
        result[_check_name(name)] = value if isinstance(value, str) else list(value)
    return result


class _Reader:
    """A cursor over the text that knows its line number, for error messages."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def line(self) -> int:
        return self.text.count("\n", 0, self.pos) + 1

    def fail(self, what: str) -> ValueError:
        start = self.text.rfind("\n", 0, self.pos) + 1
        end = self.text.find("\n", self.pos)
        shown = self.text[start : end if end >= 0 else len(self.text)]
        if len(shown) > 60:
            shown = shown[:60] + "..."
        return ValueError(f"build.data line {self.line()}: {what}: {shown!r}")

    def peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def word(self, *, allow_double: bool) -> str:
        """One shell word made of '...' segments, \\' and (in arrays) obs-build's "..." segments."""
        parts: list[str] = []
        while True:
            char = self.peek()
            if char == "'":
                match = _SQ.match(self.text, self.pos)
                if match is None:
                    raise self.fail("unterminated single quote")
                parts.append(match.group(1))
                self.pos = match.end()
            elif char == "\\" and self.text.startswith("\\'", self.pos):
                parts.append("'")
                self.pos += 2
            elif char == '"' and allow_double:
                parts.append(self._double_quoted())
            else:
                break
        if not parts:
            raise self.fail("expected a quoted value")
        return "".join(parts)

    def _double_quoted(self) -> str:
        start = self.pos
        self.pos += 1
        out: list[str] = []
        while True:
            char = self.peek()
            if char == "":
                self.pos = start
                raise self.fail("unterminated double quote")
            if char == '"':
                self.pos += 1
                return "".join(out)
            if char == "\\":
                escaped = self.text[self.pos + 1 : self.pos + 2]
                if escaped not in _DQ_ESCAPES:
                    raise self.fail('a backslash inside double quotes escapes only \\ $ " `')
                out.append(_DQ_ESCAPES[escaped])
                self.pos += 2
            elif char in "$`":
                raise self.fail(f"unescaped {char} inside double quotes (a shell would expand it)")
            else:
                out.append(char)
                self.pos += 1

    def array(self) -> list[str]:
        self.pos += 1  # "("
        items: list[str] = []
        while True:
            while self.peek() == " ":
                self.pos += 1
            if self.peek() == ")":
                self.pos += 1
                return items
            if len(items) >= MAX_ARRAY_ITEMS:
                raise self.fail(f"more than {MAX_ARRAY_ITEMS} array elements")
            items.append(self.word(allow_double=True))
            if self.peek() not in (" ", ")"):
                raise self.fail("expected a space or ) after an array element")


def read_build_data(text: str) -> dict[str, Value]:
    """Parse build.data without a shell: `NAME='value'` and `name=(...)` lines and nothing else.

    Raises ValueError naming the line for anything outside that grammar, for a NUL byte, for a
    variable set twice, and beyond MAX_BYTES / MAX_VARIABLES / MAX_ARRAY_ITEMS.
    """
    if len(text) > MAX_BYTES:  # characters; load_build_data bounds the bytes
        raise ValueError(f"build.data: larger than {MAX_BYTES} bytes")
    reader = _Reader(text)
    nul = text.find("\0")
    if nul >= 0:
        reader.pos = nul
        raise reader.fail("NUL byte")
    result: dict[str, Value] = {}
    while reader.pos < len(text):
        match = _ASSIGN.match(text, reader.pos)
        if match is None:
            raise reader.fail("expected NAME='value' or NAME=(...)")
        name = match.group(1)
        if name in result:
            raise reader.fail(f"{name} is set twice")
        if len(result) >= MAX_VARIABLES:
            raise reader.fail(f"more than {MAX_VARIABLES} variables")
        reader.pos = match.end()
        value: Value = reader.array() if reader.peek() == "(" else reader.word(allow_double=False)
        if reader.peek() != "\n":
            raise reader.fail("expected the end of the line after the value")
        reader.pos += 1
        result[name] = value
    return result


def load_build_data(path: str | os.PathLike[str]) -> dict[str, Value]:
    """Read and parse a build.data file (at most MAX_BYTES are read)."""
    with open(path, "rb") as handle:
        data = handle.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        raise ValueError(f"build.data: {os.fspath(path)} is larger than {MAX_BYTES} bytes")
    return read_build_data(data.decode("utf-8", "surrogateescape"))
