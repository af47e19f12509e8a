"""The manifest format: writer lines, the strict parser, both dialects and the mtime and mode trailers."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudbuild.disk import manifest
from cloudbuild.disk.manifest import Dir, File, Limits, Mode, Mtime, Run, Symlink, parse
from cloudbuild.errors import UntrustedData

FUZZ_EXAMPLES = int(os.environ.get("CLOUDBUILD_FUZZ_EXAMPLES", "200"))


def entries(data: bytes, **kwargs: object) -> list[manifest.Entry]:
    """Parsed in the 2018 dialect unless told otherwise (most cases here are about what both
    dialects share; `test_todays_*` are about the default)."""
    kwargs.setdefault("dialect", "obs-2018")
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


def test_todays_lines_are_the_default_dialect() -> None:
    text = b"d a 1700000000\nl a/l 1700000001 x\nf a/e 1700000002 0\nf a/f 1700000003 10 1024 3\n\n"
    want = [
        Dir(b"a", 1700000000),
        Symlink(b"a/l", b"x", 1700000001),
        File(b"a/e", 0, 0, b"", 1700000002),
        File(b"a/f", 10, 1024, b"3", 1700000003),
    ]
    assert list(parse(io.BytesIO(text))) == want
    assert entries(text, dialect="obs") == want
    with pytest.raises(UntrustedData):
        entries(text)  # read as 2018 lines: "d a 1700000000" has an extra field


def test_todays_dialect_requires_the_mtime() -> None:
    for line in (b"d a\n", b"l a x\n", b"f a 0\n", b"f a 3000 1024 5-6 0-0:951\n"):
        with pytest.raises(UntrustedData):
            entries(line + b"\n", dialect="obs")


def test_a_line_is_never_guessed_into_the_other_dialect() -> None:
    # `f a 5 1024 3` is a 2018 file of 5 bytes, or today's file with mtime 5 and a size of 1024
    # without extents (refused): the reader's dialect decides, never the line
    (entry,) = entries(b"f a 5 1024 3\n\n")
    assert entry == File(b"a", 5, 1024, b"3")
    with pytest.raises(UntrustedData, match="block size and extents"):
        entries(b"f a 5 1024 3\n\n", dialect="obs")
    with pytest.raises(UntrustedData, match="unknown entry"):
        entries(b"%format mtime\nf a 5 0\n\n", dialect="obs")  # the old header is no longer special


def test_todays_dialect_takes_the_mode_trailer_but_no_mtime_trailer() -> None:
    text = b"d a 7\nf a/b 9 0\n\n%modes\na 0700\na/b 0644\n\n\n"
    assert entries(text, dialect="obs") == [
        Dir(b"a", 7),
        File(b"a/b", 0, 0, b"", 9),
        Mode(b"a", 0o700, True),
        Mode(b"a/b", 0o644, False),
    ]
    with pytest.raises(UntrustedData, match="%mtimes trailer in the obs dialect"):
        entries(b"d a 7\n\n%mtimes\na 8\n\n", dialect="obs")


def test_an_unknown_dialect_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="dialect"):
        entries(b"", dialect="mtime")


def test_mtime_trailer_follows_the_terminator() -> None:
    got = entries(b"d a\nf a/b 0\n\n%mtimes\na 7\na/b 9\n\n\n\n")
    assert got[2:] == [Mtime(b"a", 7), Mtime(b"a/b", 9)]


def test_pad_after_the_terminator_is_not_a_trailer() -> None:
    assert entries(b"d a\n\n\n%mtimes\na 7\n\n") == [Dir(b"a")]
    assert entries(b"d a\n\n\n%modes\na 0700\n\n") == [Dir(b"a")]
    assert entries(b"d a\n\n%mtimes\na 7\n\n\n%modes\na 0700\n\n") == [Dir(b"a"), Mtime(b"a", 7)]
    assert entries(b"d a\n\n%modesX\na 0700\n\n") == [Dir(b"a")]  # not a marker: never parsed


def test_mode_trailer_follows_the_mtime_trailer() -> None:
    text = b"d a\nf a/b 0\nl c a\n\n%mtimes\na 7\nc 8\n\n%modes\na 0700\na/b 0755\n\n" + b"\n" * 512
    assert entries(text)[3:] == [
        Mtime(b"a", 7),
        Mtime(b"c", 8),
        Mode(b"a", 0o700, directory=True),
        Mode(b"a/b", 0o755, directory=False),
    ]


def test_mode_trailer_alone_or_first_and_names_escaped() -> None:
    assert entries(b"f a%20b 0\n\n%modes\na%20b 0600\n\n") == [
        File(b"a b", 0, 0, b""),
        Mode(b"a b", 0o600, directory=False),
    ]
    assert entries(b"f a 0\n\n%modes\na 0000\n\n%mtimes\na 7\n\n")[1:] == [
        Mode(b"a", 0, directory=False),
        Mtime(b"a", 7),
    ]


@pytest.mark.parametrize(
    ("claim", "mode"), [(b"4755", 0o755), (b"2775", 0o775), (b"1777", 0o777), (b"7777", 0o777)]
)
def test_setuid_setgid_and_sticky_claims_are_dropped(claim: bytes, mode: int) -> None:
    assert entries(b"d a\n\n%modes\na " + claim + b"\n\n")[1] == Mode(b"a", mode, directory=True)


@pytest.mark.parametrize(
    ("trailer", "reason"),
    [
        (b"b 0644\n", "mode for unknown entry"),
        (b"a 0644\na 0644\n", "second mode for"),
        (b"l 0777\n", "mode for the symlink"),
        (b"a 0758\n", "bad mode"),
        (b"a 755\n", "bad mode"),
        (b"a 00755\n", "bad mode"),
        (b"a +755\n", "bad mode"),
        (b"a 0x1ed\n", "bad mode"),
        (b"a 10000\n", "out of range"),
        (b"a 77777777777777777777777\n", "out of range"),
        (b"a 0644 x\n", "bad mode trailer line"),
        (b"a\n", "bad mode trailer line"),
        (b"a  0644\n", "empty field"),
        (b"a\t0644\n", "raw control byte"),
    ],
)
def test_bad_mode_trailers_are_refused(trailer: bytes, reason: str) -> None:
    with pytest.raises(UntrustedData, match=reason):
        entries(b"f a 0\nd d\nl l a\n\n%modes\n" + trailer + b"\n")


def test_no_more_trailer_lines_than_entries() -> None:
    with pytest.raises(UntrustedData, match="more mode lines than entries"):
        entries(b"f a 0\nd d\n\n%modes\na 0644\nd 0755\na 0644\n\n")
    with pytest.raises(UntrustedData, match="more mtime lines than entries"):
        entries(b"f a 0\n\n%mtimes\na 1\na 2\n\n")


def test_each_trailer_at_most_once_and_terminated() -> None:
    with pytest.raises(UntrustedData, match="second %modes trailer"):
        entries(b"f a 0\n\n%modes\na 0644\n\n%modes\n\n")
    with pytest.raises(UntrustedData, match="second %mtimes trailer"):
        entries(b"f a 0\n\n%mtimes\n\n%modes\n\n%mtimes\n\n")
    with pytest.raises(UntrustedData, match="without its terminating empty line"):
        entries(b"f a 0\n\n%modes\na 0644\n")


def test_trailer_markers_respect_the_manifest_limit() -> None:
    text = b"f a 0\n\n%modes\na 0644\n\n"
    assert entries(text, limits=Limits(max_manifest=len(text))) == [
        File(b"a", 0, 0, b""),
        Mode(b"a", 0o644, False),
    ]
    assert entries(text, limits=Limits(max_manifest=9)) == [
        File(b"a", 0, 0, b"")
    ]  # marker past the limit: not read
    with pytest.raises(UntrustedData, match="longer than"):
        entries(text, limits=Limits(max_manifest=len(text) - 1))


def test_mode_trailer_writer() -> None:
    assert manifest.mode_trailer([(b"a b", 0o100755), (b"d", 0o40700), (b"s", 0o104755)]) == (
        b"%modes\na%20b 0755\nd 0700\ns 0755\n\n"
    )


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
    got = entries(lines + b"\n", dialect="obs")
    assert [(e.name, e.mtime) for e in got] == [(n, mtime) for n in names]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=8, unique=True),
    st.lists(st.integers(0, 0o177777), min_size=8, max_size=8),
    st.integers(0, 10**10),
)
def test_trailer_writer_output_parses_back(raw_names: list[bytes], modes: list[int], mtime: int) -> None:
    names = list(dict.fromkeys(n.replace(b"/", b"_") for n in raw_names))
    names = [n for n in names if manifest.name_problem(n) is None]
    lines = b"".join(manifest.file_line(n, 1, 512, [b"1"]) for n in names)
    text = (
        lines
        + b"\n"
        + manifest.mtime_trailer((n, mtime) for n in names)
        + manifest.mode_trailer(zip(names, modes, strict=False))
        + b"\n" * 3
    )
    got = entries(text)[len(names) :]
    assert got == [Mtime(n, mtime) for n in names] + [
        Mode(n, m & 0o777, False) for n, m in zip(names, modes, strict=False)
    ]


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


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        (b"a/../b", "'..' component"),  # `..` in the middle: tested here, not through the parent rule
        (b"a/b/../../c", "'..' component"),
        (b"a/./b", "'.' or '..' component"),
        (b"a/..", "'..' component"),
        (b"../a", "'..' component"),
        (b"..", "'..' component"),
        (b"a//b", "empty"),
        (b"/a", "absolute"),
        (b"a/", "empty"),
        (b"a\0b", "NUL"),
        (b"a/..b/c..", None),  # dots inside a component are just bytes
        (b"...", None),
        (b"a/b", None),
    ],
)
def test_name_problem_directly(name: bytes, problem: str | None) -> None:
    """blocklist and e2manifest rely on `name_problem` alone (no parent rule on their side)."""
    got = manifest.name_problem(name)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got, got
