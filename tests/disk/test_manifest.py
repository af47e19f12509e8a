"""The manifest format: writer lines, the strict parser, both dialects and the mtime trailer."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudbuild.disk import manifest
from cloudbuild.disk.manifest import Dir, File, Limits, Mtime, Run, Symlink, parse
from cloudbuild.errors import UntrustedData

FUZZ_EXAMPLES = int(os.environ.get("CLOUDBUILD_FUZZ_EXAMPLES", "200"))


def entries(data: bytes, **kwargs: object) -> list[manifest.Entry]:
    return list(parse(io.BytesIO(data), **kwargs))  # type: ignore[arg-type]


def test_escape_matches_computeblocklists() -> None:
    assert manifest.escape(b"a b%c\n\x00\x1f\x7f\xff/") == b"a%20b%25c%0A%00%1F\x7f\xff/"
    assert manifest.unescape(b"a%20b%25c%0A%1F\x7f\xff/", "name") == b"a b%c\n\x1f\x7f\xff/"


@pytest.mark.parametrize(
    ("start", "end", "islast", "token"),
    [
        (0, 1023, False, b"0"),  # one hole block
        (0, 4999, False, b"0-4:903"),  # a 5000-byte hole
        (1024, 2047, False, b"1"),
        (1024, 3071, False, b"1-2"),
        (1024 + 100, 2047, False, b"1:100"),
        (1024, 1024 + 99, False, b"1-1:99"),
        (1024, 1024 + 99, True, b"1"),  # the last extent rounds up to its block's end
        (5 * 1024 + 7, 9 * 1024 + 3, False, b"5:7-9:3"),
    ],
)
def test_extent_token_is_createext(start: int, end: int, islast: bool, token: bytes) -> None:
    assert manifest.extent_token(start, end, 1024, islast=islast) == token


def test_obs_lines_parse() -> None:
    got = entries(b"d RPMS\nl RPMS/link ../x\nf RPMS/e 0\nf RPMS/x 3000 1024 5-6 0-0:951\n\ngarbage")
    assert got[:3] == [Dir(b"RPMS"), Symlink(b"RPMS/link", b"../x"), File(b"RPMS/e", 0, 0, b"")]
    runs = list(got[3].runs(disk_size=1 << 20))  # type: ignore[union-attr]
    assert runs == [Run(5120, 2048), Run(None, 952)]


def test_end_of_input_after_a_complete_line_ends_the_manifest() -> None:
    assert entries(b"d a\n") == [Dir(b"a")]
    assert entries(b"") == []


def test_inline_mtime_generation_needs_the_header_or_the_dialect() -> None:
    text = b"d a 1700000000\nl a/l 1700000001 x\nf a/e 1700000002 0\nf a/f 1700000003 10 1024 3\n\n"
    want = [
        Dir(b"a", 1700000000),
        Symlink(b"a/l", b"x", 1700000001),
        File(b"a/e", 0, 0, b"", 1700000002),
        File(b"a/f", 10, 1024, b"3", 1700000003),
    ]
    assert entries(manifest.HEADER_MTIME + b"\n" + text) == want
    assert entries(text, dialect="mtime") == want
    with pytest.raises(UntrustedData):
        entries(text)  # read as obs lines: "d a 1700000000" has an extra field
    with pytest.raises(UntrustedData, match="header"):
        entries(manifest.HEADER_MTIME + b"\n" + text, dialect="obs")


def test_obs_line_that_looks_like_inline_is_never_guessed() -> None:
    # `f a 5 1024 3` is an obs file of 5 bytes, not mtime 5 + size 1024: obs lines win without a header
    (entry,) = entries(b"f a 5 1024 3\n\n")
    assert entry == File(b"a", 5, 1024, b"3")


def test_mtime_trailer_follows_the_terminator() -> None:
    got = entries(b"d a\nf a/b 0\n\n%mtimes\na 7\na/b 9\n\n\n\n")
    assert got[2:] == [Mtime(b"a", 7), Mtime(b"a/b", 9)]


def test_pad_after_the_terminator_is_not_a_trailer() -> None:
    assert entries(b"d a\n\n\n%mtimes\na 7\n\n") == [Dir(b"a")]


def test_writer_round_trips_any_name_bytes() -> None:
    names = [bytes([b]) + b"x" for b in range(1, 256) if b not in (0x2F, 0x2E)]
    text = b"".join(manifest.dir_line(n) for n in names) + b"\n"
    assert [e.name for e in entries(text)] == names


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=8, unique=True), st.integers(0, 10**10)
)
def test_writer_output_parses_back(raw_names: list[bytes], mtime: int) -> None:
    names = list(dict.fromkeys(n.replace(b"/", b"_") for n in raw_names))
    names = [n for n in names if manifest.name_problem(n) is None]
    lines = b"".join(manifest.file_line(n, 1, 512, [b"1"], mtime=mtime) for n in names)
    got = entries(manifest.header("mtime") + lines + b"\n")
    assert [(e.name, e.mtime) for e in got] == [(n, mtime) for n in names]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(manifest.DIALECTS))
def test_parser_raises_only_untrusted_data(data: bytes, dialect: manifest.Dialect) -> None:
    try:
        for entry in parse(io.BytesIO(data), dialect=dialect, limits=Limits(max_line=200, max_manifest=250)):
            if isinstance(entry, File) and entry.size:
                total = sum(run.length for run in entry.runs(disk_size=1 << 20))
                assert total == entry.size
    except UntrustedData:
        pass


@pytest.mark.parametrize(
    ("name", "target", "ok"),
    [
        (b"a", b"b", True),
        (b"a/l", b"../b", True),
        (b"a/b/l", b"../../c/d", True),
        (b"a/l", b"../../b", False),
        (b"l", b"..", False),
        (b"a/l", b"..", True),
        (b"a/l", b"x/../y", False),
        (b"a/l", b"/etc/passwd", False),
        (b"a/l", b"./b", False),
        (b"a/l", b"b/", False),
        (b"a/l", b"", False),
    ],
)
def test_symlink_rules_are_extractbuilds(name: bytes, target: bytes, ok: bool) -> None:
    assert (manifest.symlink_problem(name, target) is None) is ok
