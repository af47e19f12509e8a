"""The guest-side manifest writer: its command line, warnings and refusals, and its import footprint."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cloudbuild.disk import blocklist, manifest

from .conftest import COMPUTEBLOCKLISTS, PEER_COMPUTEBLOCKLISTS

REPO = Path(__file__).resolve().parents[2]


def blocklist_cli(args: list[str], cwd: Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "cloudbuild.commands.blocklist", *args], cwd=cwd, input=stdin, capture_output=True
    )


def test_guest_import_pulls_in_nothing_but_the_standard_library() -> None:
    code = (
        "before = set(sys.modules); import cloudbuild.disk.blocklist;"
        "third = [m for m in set(sys.modules) - before"
        " if m.split('.')[0] not in sys.stdlib_module_names and m.split('.')[0] != 'cloudbuild'];"
        "third += [m for m in ('argparse', 'cloudbuild.commands') if m in sys.modules];"  # CLI code stays out
        "print(third); sys.exit(1 if third else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); {code}"],
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_bad_symlinks_and_special_files_are_skipped_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    os.symlink("/etc/passwd", tmp_path / "out" / "abs")
    os.symlink("../../x", tmp_path / "out" / "escape")
    os.symlink("../x", tmp_path / "out" / "fine")
    os.mkfifo(tmp_path / "out" / "fifo")
    proc = blocklist_cli(
        ["--format", "obs-2018", "out", "out/abs", "out/escape", "out/fine", "out/fifo"], tmp_path
    )
    assert proc.returncode == 0
    assert proc.stdout == b"d out\nl out/fine ../x\n"
    assert b"out/abs: bad symlink" in proc.stderr
    assert b"out/escape: bad symlink" in proc.stderr
    assert b"out/fifo: unsupported file type" in proc.stderr


def test_names_extractbuild_would_refuse_fail_and_write_nothing(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    for bad in (str(tmp_path / "f"), "./f", "f/", "../f"):
        proc = blocklist_cli(["--padstart", "10", "f", bad], tmp_path)
        assert proc.returncode == 1, bad
        assert proc.stdout == b""


def test_file_that_cannot_be_block_mapped_fails(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    assert shm.is_dir(), "tmpfs at /dev/shm is needed for this test"
    path = shm / f"cloudbuild-test-{os.getpid()}"
    path.write_bytes(b"x" * 5000)
    try:
        proc = blocklist_cli([path.name], shm)
    finally:
        path.unlink()
    assert proc.returncode == 1
    assert b"could not get the extent list" in proc.stderr
    assert proc.stdout == b""


def test_names_from_a_manifest_file_newline_or_nul_separated(tmp_path: Path) -> None:
    (tmp_path / "a b").write_bytes(b"")
    (tmp_path / "list").write_bytes(b"a b\n")
    proc = blocklist_cli(["--format", "obs-2018", "--manifest", "list"], tmp_path)
    assert proc.stdout == b"f a%20b 0\n"
    proc = blocklist_cli(["--format", "obs-2018", "--manifest", "-", "-0"], tmp_path, stdin=b"a b\0")
    assert proc.stdout == b"f a%20b 0\n"


def test_pads_and_formats(tmp_path: Path) -> None:
    (tmp_path / "e").write_bytes(b"")
    os.utime(tmp_path / "e", (1234, 1234))
    out = io.BytesIO()
    names = [b"e"]
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert blocklist.write_manifest(names, out, padstart=3, padend=2, fmt="obs", dir_fd=fd) == 1
        assert out.getvalue() == b"\n\n\nf e 1234 0\n\n\n"
        out = io.BytesIO()
        blocklist.write_manifest(names, out, padstart=3, padend=2, fmt="obs-2018", dir_fd=fd)
        assert out.getvalue() == b"\n\n\nf e 0\n\n\n"
        out = io.BytesIO()
        blocklist.write_manifest(names, out, padstart=1, fmt="obs-2018+mtimes", dir_fd=fd)
        assert out.getvalue() == b"\nf e 0\n\n%mtimes\ne 1234\n\n"
    finally:
        os.close(fd)


def test_default_format_writes_inline_mtimes_and_the_mode_trailer(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "tool").write_bytes(b"")
    (tmp_path / "d" / "suid").write_bytes(b"")
    (tmp_path / "d" / "link").symlink_to("tool")
    os.chmod(tmp_path / "d" / "tool", 0o755)
    os.chmod(tmp_path / "d" / "suid", 0o4750)
    os.chmod(tmp_path / "d", 0o1700)
    for path, when in (("d/tool", 10), ("d/suid", 11), ("d", 12)):
        os.utime(tmp_path / path, (when, when))
    os.utime(tmp_path / "d" / "link", (13, 13), follow_symlinks=False)
    names = ["d", "d/tool", "d/suid", "d/link"]
    want = (
        b"\nd d 12\nf d/tool 10 0\nf d/suid 11 0\nl d/link 13 tool\n\n"
        b"%modes\nd 0700\nd/tool 0755\nd/suid 0750\n\n\n"  # no setuid/sticky, no symlink
    )
    want_2018 = (
        b"\nd d\nf d/tool 0\nf d/suid 0\nl d/link tool\n\n"
        b"%mtimes\nd 12\nd/tool 10\nd/suid 11\nd/link 13\n\n"
        b"%modes\nd 0700\nd/tool 0755\nd/suid 0750\n\n\n"
    )
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        out = io.BytesIO()
        blocklist.write_manifest(names, out, padstart=1, padend=1, dir_fd=fd)
        assert out.getvalue() == want
        out = io.BytesIO()
        blocklist.write_manifest(names, out, padstart=1, padend=1, fmt="obs+modes", dir_fd=fd)
        assert out.getvalue() == want
        out = io.BytesIO()
        blocklist.write_manifest(names, out, padstart=1, padend=1, fmt="obs-2018+meta", dir_fd=fd)
        assert out.getvalue() == want_2018
    finally:
        os.close(fd)
    proc = blocklist_cli(["--padstart", "1", "--padend", "1", *names], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == want
    parsed = list(manifest.parse(io.BytesIO(want[1:])))
    assert [e.mtime for e in parsed if not isinstance(e, manifest.Mode)] == [12, 10, 11, 13]
    old = list(manifest.parse(io.BytesIO(want_2018[1:]), dialect="obs-2018"))
    assert [e for e in old if isinstance(e, manifest.Mode)] == [e for e in parsed if isinstance(e, manifest.Mode)]
    assert [e for e in parsed if isinstance(e, manifest.Mode)] == [
        manifest.Mode(b"d", 0o700, True),
        manifest.Mode(b"d/tool", 0o755, False),
        manifest.Mode(b"d/suid", 0o750, False),
    ]


def test_every_existing_format_flag_still_works(tmp_path: Path) -> None:
    (tmp_path / "e").write_bytes(b"")
    os.utime(tmp_path / "e", (5, 5))
    os.chmod(tmp_path / "e", 0o640)
    got = {fmt: blocklist_cli(["--format", fmt, "e"], tmp_path).stdout for fmt in manifest.WRITE_FORMATS}
    assert got == {
        "obs": b"f e 5 0\n",
        "obs+modes": b"f e 5 0\n\n%modes\ne 0640\n\n",
        "obs-2018": b"f e 0\n",
        "obs-2018+meta": b"f e 0\n\n%mtimes\ne 5\n\n%modes\ne 0640\n\n",
        "obs-2018+mtimes": b"f e 0\n\n%mtimes\ne 5\n\n",
    }
    refused = blocklist_cli(["--format", "mtime", "e"], tmp_path)
    assert refused.returncode == 1 and b"invalid choice" in refused.stderr  # a usage error, not "unchanged"
    assert len(refused.stderr.splitlines()) == 1


def test_fiemap_of_a_sparse_file_on_the_host_filesystem(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.seek(1 << 20)
        f.write(b"x" * 10)
    fd = os.open(path, os.O_RDONLY)
    try:
        bsize = blocklist.block_size(fd)
        tokens = blocklist.fiemap_extents(fd, os.fstat(fd).st_size, bsize)
    finally:
        os.close(fd)
    assert tokens[0] == manifest.extent_token(0, (1 << 20) - 1, bsize)  # the leading hole
    assert len(tokens) == 2 and not tokens[1].startswith(b"0")


@pytest.mark.parametrize("nr", [blocklist.FIBMAP, blocklist.FIGETBSZ, blocklist.FS_IOC_FIEMAP])
def test_alternate_ioctl_numbers_differ(nr: int) -> None:
    assert blocklist._alt_ioctl(nr) != nr


def test_fibmap_is_the_fallback_when_fiemap_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.write(os.urandom(50_000))
        f.seek(200_000)
        f.write(b"end")
    fd = os.open(path, os.O_RDONLY)
    try:
        size, bsize = os.fstat(fd).st_size, blocklist.block_size(fd)
        expected = blocklist.fibmap_extents(fd, size, bsize)

        def broken(*_: object) -> list[bytes]:
            raise OSError(95, "Operation not supported")

        monkeypatch.setattr(blocklist, "fiemap_extents", broken)
        assert blocklist.file_extents(fd, size, bsize) == expected
    finally:
        os.close(fd)
    assert expected[1].startswith(b"0")  # the hole between the two writes is a 0-run


def test_missing_name_list_file_is_a_clean_error(tmp_path: Path) -> None:
    proc = blocklist_cli(["--manifest", "nonexistent"], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.startswith(b"blocklist: --manifest:")
    assert proc.stdout == b""


def test_missing_directories_are_listed_and_duplicates_dropped(tmp_path: Path) -> None:
    (tmp_path / "RPMS" / "x86_64").mkdir(parents=True)
    (tmp_path / "RPMS" / "x86_64" / "a.rpm").write_bytes(b"")
    (tmp_path / "RPMS" / "b.rpm").write_bytes(b"")
    proc = blocklist_cli(
        ["--format", "obs-2018", "RPMS/x86_64/a.rpm", "RPMS/b.rpm", "RPMS/b.rpm", "RPMS", "RPMS/x86_64"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"d RPMS\nd RPMS/x86_64\nf RPMS/x86_64/a.rpm 0\nf RPMS/b.rpm 0\n"
    assert proc.stderr.count(b"listed twice, ignored") == 3
    assert list(manifest.parse(io.BytesIO(proc.stdout), dialect="obs-2018"))  # the extractors accept it


def test_a_file_cannot_be_the_parent_of_a_listed_name(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    (tmp_path / "l").symlink_to("f")
    for listing in (["f", "f/x"], ["l/x"]):
        proc = blocklist_cli(listing, tmp_path)
        assert proc.returncode == 1, listing
        assert b"is not a directory that can be listed" in proc.stderr


def test_many_extents_span_several_fiemap_calls_and_match_computeblocklists(tmp_path: Path) -> None:
    with open(tmp_path / "holey", "wb") as f:
        for i in range(300):  # 300 data extents separated by holes: several FIEMAP calls each side
            f.seek(i * 3 * 4096)
            f.write(os.urandom(4096))
        f.truncate(300 * 3 * 4096 + 100)
    for fmt, script in (("obs", PEER_COMPUTEBLOCKLISTS), ("obs-2018", COMPUTEBLOCKLISTS)):
        ours = blocklist_cli(["--format", fmt, "holey"], tmp_path)
        perl = subprocess.run(["perl", script, "holey"], cwd=tmp_path, capture_output=True, check=True)
        assert ours.stdout == perl.stdout, fmt
    assert ours.stdout.count(b" 0-1") >= 299  # the 8 KiB holes between the data blocks
