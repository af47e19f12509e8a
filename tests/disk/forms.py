"""The two manifest forms for test data: cases are written once in the 2018 form and converted
to today's form (inline mtimes) by one mechanical rule, so every hostile case exists in both."""

from __future__ import annotations

from cloudbuild.disk import manifest

MTIME = b"1700000000"
OLD_HEADER = b"%format mtime"  # a cloudbuild extension of 2025: its cases are today's form already


def to_today(data: bytes, mtime: bytes = MTIME) -> bytes:
    """`data` (2018 form, possibly malformed) in today's form: in every entry line (up to the first
    empty line) MTIME goes after the name, i.e. after the second space-separated field; a leading
    `%format mtime` header is dropped (its lines carry their mtime already); the rest (trailers,
    pad, garbage) is kept byte for byte."""
    lines = data.split(b"\n")
    if lines and lines[0] == OLD_HEADER:
        return b"\n".join(lines[1:])
    out = []
    for index, line in enumerate(lines):
        if not line:
            out.extend(lines[index:])
            break
        fields = line.split(b" ")
        if fields[0] in (b"d", b"l", b"f") and len(fields) >= 2:
            fields.insert(2, mtime)
        out.append(b" ".join(fields))
    return b"\n".join(out)


def in_form(data: bytes, dialect: manifest.Dialect) -> bytes:
    return to_today(data) if dialect == "obs" else data
