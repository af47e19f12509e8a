"""A hostile guest writes the manifest: every bad one fails with exit 3 and leaves nothing behind.

The curated corpus is tests/disk/hostile/{obs,obs-2018}/*.manifest, every case in both forms (read
with --skip 0 and the matching --manifest-format against a 1 MiB raw disk); the hypothesis fuzz
below generates manifests from a grammar of dangerous tokens, in both forms. For a long fuzz
run: CLOUDBUILD_FUZZ_EXAMPLES=200000 pytest tests/disk/test_extract_hostile.py -k fuzz
"""

from __future__ import annotations

import io
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudbuild.commands.extract import main
from cloudbuild.disk import extract
from cloudbuild.disk.extract import RawDisk, extract_stream
from cloudbuild.disk.manifest import DIALECTS, Dialect
from cloudbuild.errors import InfraError, UntrustedData

from .conftest import leftovers
from .forms import in_form, to_today
from .hostile import regenerate

HOSTILE = Path(__file__).parent / "hostile"
CORPUS = [(form, case) for form in DIALECTS for case in sorted((HOSTILE / form).glob("*.manifest"))]
DISK_SIZE = 1024 * 1024
FUZZ_EXAMPLES = int(os.environ.get("CLOUDBUILD_FUZZ_EXAMPLES", "200"))


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Path:
    disk = tmp_path_factory.mktemp("hostile") / "disk.raw"
    disk.write_bytes(os.urandom(DISK_SIZE))
    return disk


def test_corpus_is_large_enough_and_every_case_is_in_both_forms() -> None:
    old = sorted(p.name for p in (HOSTILE / "obs-2018").glob("*.manifest"))
    assert len(old) >= 70
    assert sorted(p.name for p in (HOSTILE / "obs").glob("*.manifest")) == old
    assert {name: (HOSTILE / "obs" / name).read_bytes() for name in old} == regenerate.generated()


@pytest.mark.parametrize(("form", "case"), CORPUS, ids=lambda x: x.stem if isinstance(x, Path) else x)
def test_hostile_manifest_fails_cleanly_with_exit_3(
    form: str, case: Path, small_disk: Path, dest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["--disk", str(small_disk), "--input", str(case), "--dest", str(dest), "--manifest-format", form]
    )
    err = capsys.readouterr().err
    assert code == 3, err
    reason = [line for line in err.splitlines() if line.startswith("cloudbuild extract: ")]
    assert len(reason) == 1 and len(reason[0]) < 400
    assert leftovers(dest) == []


@pytest.mark.parametrize("form", DIALECTS)
def test_a_valid_manifest_in_the_same_harness_succeeds(small_disk: Path, dest: Path, form: Dialect) -> None:
    """The corpus harness can tell success from failure."""
    good = dest.parent.parent / "good.manifest"
    good.write_bytes(
        in_form(
            b"d ok\nf ok/data 2048 1024 1-2\nl ok/link data\nf ok/hole 3000 1024 0-1 3:100-3:199 0-0:851\n\n",
            form,
        )
    )
    argv = ["--disk", str(small_disk), "--input", str(good), "--dest", str(dest), "--manifest-format", form]
    assert main(argv) == 0
    data = small_disk.read_bytes()
    assert (dest / "ok" / "data").read_bytes() == data[1024:3072]
    assert (dest / "ok" / "hole").read_bytes() == bytes(2048) + data[3172:3272] + bytes(852)
    assert os.readlink(dest / "ok" / "link") == "data"


def test_setuid_setgid_and_sticky_claims_come_back_as_permission_bits_only(
    small_disk: Path, dest: Path
) -> None:
    manifest = dest.parent.parent / "claims.manifest"
    manifest.write_bytes(
        to_today(
            b"f suid 2048 1024 1-2\nd sticky\nf sticky/sgid 0\nf plain 0\n\n"
            b"%modes\nsuid 4755\nsticky 1777\nsticky/sgid 2750\nplain 0600\n\n"
        )
    )
    assert main(["--disk", str(small_disk), "--input", str(manifest), "--dest", str(dest)]) == 0
    modes = {
        name: stat.S_IMODE(os.lstat(dest / name).st_mode)
        for name in ("suid", "sticky", "sticky/sgid", "plain")
    }
    assert modes == {"suid": 0o755, "sticky": 0o777, "sticky/sgid": 0o750, "plain": 0o600}
    assert (dest / "suid").read_bytes() == small_disk.read_bytes()[1024:3072]


_READ_ONLY_TREE = (
    b"d x\nd x/ro\nf x/ro/in 2048 1024 1-2\nd x/ro/none\nf x/ro/none/deep 0\nf x/f 0\nl x/l ro/in\n\n"
    b"%mtimes\nx 5\nx/ro 6\nx/ro/none 7\nx/l 8\n\n"
    b"%modes\nx 0500\nx/ro 0555\nx/ro/in 0400\nx/ro/none 0000\nx/ro/none/deep 0000\nx/f 0700\n\n"
)


def _as_nobody(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """Run argv without root's permission overrides: directory modes then really bite."""
    if os.geteuid() != 0:
        return subprocess.run(argv, cwd=cwd, capture_output=True)
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed for this test"
    uid = pwd.getpwnam("nobody").pw_uid
    for path in [str(cwd), *_all_paths(str(cwd))]:
        os.lchown(path, uid, -1)
    return subprocess.run(
        [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all", *argv],
        cwd=cwd,
        capture_output=True,
    )


@pytest.fixture()
def work() -> Iterator[Path]:
    """A folder in /tmp (every parent traversable by nobody), removed by root afterwards."""
    with tempfile.TemporaryDirectory(prefix="cloudbuild-nobody-") as folder:
        yield Path(folder)


def test_read_only_directories_are_filled_first_even_without_root(small_disk: Path, work: Path) -> None:
    """Directory modes are applied last, deepest first: a non-root extractor (no permission
    overrides) can still create everything inside 0500/0555/0000 directories and move them."""
    (work / "m").write_bytes(_READ_ONLY_TREE)
    shutil.copy(small_disk, work / "disk")
    (work / "dest").mkdir()
    proc = _as_nobody(
        [
            sys.executable,
            *(["-m", "cloudbuild.commands.extract", "--manifest-format", "obs-2018"]),
            *(["--disk", "disk", "--input", "m", "--dest", "dest"]),
        ],
        work,
    )
    assert proc.returncode == 0, proc.stderr
    x = work / "dest" / "x"
    modes = {
        str(p.relative_to(x)): stat.S_IMODE(p.lstat().st_mode)
        for p in [x, *x.rglob("*")]
        if not p.is_symlink()
    }
    assert modes == {".": 0o500, "ro": 0o555, "ro/in": 0o400, "ro/none": 0, "ro/none/deep": 0, "f": 0o700}
    assert (x / "ro" / "in").read_bytes() == small_disk.read_bytes()[1024:3072]
    assert [int(os.lstat(x / n).st_mtime) for n in (".", "ro", "ro/none", "l")] == [5, 6, 7, 8]
    # a refusal after extraction (the name exists in dest) still leaves nothing behind
    (work / "dest2").mkdir()
    (work / "dest2" / "x").mkdir()
    proc = _as_nobody(
        [
            sys.executable,
            "-m",
            "cloudbuild.commands.extract",
            "--manifest-format",
            "obs-2018",
            "--disk",
            "disk",
            "--input",
            "m",
            "--dest",
            "dest2",
        ],
        work,
    )
    assert proc.returncode == 3 and b"already exists" in proc.stderr, proc.stderr
    assert sorted(os.listdir(work)) == ["dest", "dest2", "disk", "m"]
    assert os.listdir(work / "dest2" / "x") == []


def test_hostile_manifest_through_the_command_line(small_disk: Path, dest: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cloudbuild.commands.extract", "--disk", str(small_disk), "--dest", str(dest)],
        input=b"d a 5\nf a/../../etc/passwd 5 0\n",
        capture_output=True,
    )
    assert proc.returncode == 3
    # the reason is the name rule itself: exit 3 alone would also come from the parent rule
    reason = proc.stderr.decode().strip().splitlines()[-1]
    assert reason.startswith("cloudbuild extract: manifest: line 2: "), reason
    assert "'..' component: 'a/../../etc/passwd'" in reason, reason
    assert leftovers(dest) == []


def test_existing_symlink_in_destination_is_not_written_through(small_disk: Path, dest: Path) -> None:
    outside = dest.parent.parent / "outside"
    outside.mkdir()
    os.symlink(outside, dest / "a")
    with pytest.raises(UntrustedData, match="already exists"):
        extract_stream(RawDisk(os.open(small_disk, os.O_RDONLY)), io.BytesIO(to_today(b"d a\nf a/x 0\n\n")), dest=dest)
    assert os.listdir(outside) == []


def test_line_and_entry_limits(small_disk: Path, dest: Path) -> None:
    from cloudbuild.disk.manifest import Limits

    fd = os.open(small_disk, os.O_RDONLY)
    try:
        disk = RawDisk(fd)
        with pytest.raises(UntrustedData, match="longer than"):
            extract_stream(
                disk, io.BytesIO(b"f " + b"a" * 200 + b" 0\n\n"), dest=dest, limits=Limits(max_line=100), dialect="obs-2018"
            )
        with pytest.raises(UntrustedData, match="more than 3 entries"):
            extract_stream(
                disk, io.BytesIO(b"f a 0\nf b 0\nf c 0\nf d 0\n\n"), dest=dest, limits=Limits(max_entries=3), dialect="obs-2018"
            )
        with pytest.raises(UntrustedData, match="longer than 50 bytes"):
            extract_stream(
                disk,
                io.BytesIO(b"".join(b"f %d 0\n" % i for i in range(20))),
                dest=dest,
                limits=Limits(max_manifest=50),
                dialect="obs-2018",
            )
    finally:
        os.close(fd)
    assert leftovers(dest) == []


# ---------------------------------------------------------------------------------------------
# fuzz

_COMPONENTS = ["a", "b", "..", ".", "", "%2F", "%00", "%20", "%25", "%2", "%0a", "x y", "c" * 260, "\t"]
_NUMBERS = st.one_of(
    st.integers(0, 4),
    st.integers(0, 2000),
    st.sampled_from(
        [511, 512, 1023, 1024, 4095, 4096, 65536, DISK_SIZE - 1, DISK_SIZE, 2**31, 2**63, 10**30]
    ),
).map(str)


_MODES = st.one_of(
    st.integers(0, 0o7777).map(lambda m: f"{m:04o}"),
    st.sampled_from(["0755", "0644", "0000", "4755", "7777", "755", "0758", "10755", "-755", "0x1ed", ""]),
)


@st.composite
def _names(draw: st.DrawFn) -> str:
    return "/".join(draw(st.lists(st.sampled_from(_COMPONENTS), min_size=1, max_size=4)))


@st.composite
def _extent(draw: st.DrawFn) -> str:
    token = draw(_NUMBERS)
    if draw(st.booleans()):
        token += ":" + draw(_NUMBERS)
    if draw(st.booleans()):
        token += "-" + draw(_NUMBERS)
        if draw(st.booleans()):
            token += ":" + draw(_NUMBERS)
    return token


@st.composite
def _line(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["d", "l", "f", "f", "f", "x", "%mtimes", "%modes", ""]))
    name = draw(_names())
    if kind == "d":
        return f"d {name}"
    if kind == "l":
        return f"l {name} {draw(_names())}"
    if kind == "f":
        size = draw(_NUMBERS)
        if size == "0" and draw(st.booleans()):
            return f"f {name} 0"
        blksize = draw(st.sampled_from(["512", "1024", "4096", "0", "1000", "131072"]))
        extents = " ".join(draw(st.lists(_extent(), min_size=0, max_size=5)))
        return f"f {name} {size} {blksize} {extents}".rstrip()
    if kind in ("%mtimes", "%modes"):
        return kind
    return f"{kind} {name}" if kind else ""


_MTIMES = st.one_of(
    st.integers(0, 10**11 - 1).map(str), st.sampled_from(["0", "-1", "01", "1e9", "10" + "0" * 10, "x"])
)


@st.composite
def _plausible(draw: st.DrawFn, form: Dialect = "obs-2018") -> bytes:
    """Mostly well-formed manifests (so extraction gets far), with a few dangerous choices; in
    today's form each line gets its own drawn mtime (mostly good) and no %mtimes trailer."""
    dirs = [""]
    lines: list[str] = []
    names: list[str] = []
    for _ in range(draw(st.integers(1, 8))):
        parent = draw(st.sampled_from(dirs))
        component = draw(st.sampled_from(["a", "b", "c%20d", "e%25f", "g%0Ah", "\xff", "x", "..", "%2F"]))
        name = f"{parent}/{component}" if parent else component
        names.append(name)
        kind = draw(st.sampled_from("dfffl"))
        if kind == "d":
            lines.append(f"d {name}")
            dirs.append(name)
        elif kind == "l":
            target = draw(st.sampled_from(["a", "../a", "../../a", "b/c", "/etc", "a/../..", "..", "./a"]))
            lines.append(f"l {name} {target}")
        else:
            bs = draw(st.sampled_from([512, 1024, 4096]))
            size = draw(st.integers(0, 40_000))
            if size == 0:
                lines.append(f"f {name} 0")
                continue
            tokens, left = [], size
            while left > 0:
                blocks = draw(st.integers(1, 4))
                start = 0 if draw(st.booleans()) else draw(st.integers(1, DISK_SIZE // bs))
                tokens.append(f"{start}-{start + blocks - 1}" if blocks > 1 else str(start))
                left -= blocks * bs
            if draw(st.integers(0, 4)) == 0:
                tokens[draw(st.integers(0, len(tokens) - 1))] = draw(_extent())
            lines.append(f"f {name} {size} {bs} {' '.join(tokens)}")
    if form == "obs":
        lines = [_with_mtime(line, draw(_MTIMES) if draw(st.integers(0, 9)) == 0 else "1700000000") for line in lines]
    text = "\n".join(lines) + "\n\n"
    trailers = []
    if form == "obs-2018" and draw(st.booleans()):
        stamped = draw(st.lists(st.sampled_from(names), max_size=3))
        trailers.append("%mtimes\n" + "".join(f"{n} {draw(_NUMBERS)}\n" for n in stamped) + "\n")
    if draw(st.booleans()):
        moded = draw(st.lists(st.sampled_from(names), max_size=len(names) + 1))
        trailers.append("%modes\n" + "".join(f"{n} {draw(_MODES)}\n" for n in moded) + "\n")
    if draw(st.booleans()):
        trailers.reverse()
    text += "".join(trailers)
    return text.encode("utf-8", "surrogateescape")


def _with_mtime(line: str, mtime: str) -> str:
    kind, name, *rest = line.split(" ")
    return " ".join([kind, name, mtime, *rest])


@st.composite
def _manifest(draw: st.DrawFn, form: Dialect) -> bytes:
    """A manifest in `form`: plausible ones written in it, raw grammar ones converted to it."""
    if draw(st.integers(0, 2)):
        return draw(_plausible(form))
    lines = draw(st.lists(_line(), max_size=12))
    if draw(st.booleans()):
        lines.insert(0, "%format mtime")
    text = "\n".join(lines) + draw(
        st.sampled_from(
            [
                "\n",
                "\n\n",
                "",
                "\n\n%mtimes\na 5\n\n",
                "\n\n%modes\na 4755\n\n",
                "\n\n%mtimes\na 5\n\n%modes\na 0755\nb 0000\n\n",
            ]
        )
    )
    data = in_form(text.encode("utf-8", "surrogateescape"), form)
    if draw(st.integers(0, 9)) == 0:
        data += draw(st.binary(max_size=64))
    return data


class _Guard:
    """Checks every copy the extractor makes reads inside the disk."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.bad: list[tuple[int, int]] = []

    def wrap(self, original: object) -> object:
        def copy(this: object, src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
            if src_off < 0 or length < 0 or src_off + length > self.size:
                self.bad.append((src_off, length))
            original(this, src, src_off, dst, dst_off, length)  # type: ignore[operator]

        return copy


def _all_paths(root: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield os.path.join(dirpath, name)


@settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    form_and_data=st.sampled_from(DIALECTS).flatmap(lambda form: st.tuples(st.just(form), _manifest(form))),
    max_size=st.sampled_from([None, 0, 4096, 100_000]),
)
def test_fuzz_extractor_stays_inside_its_bounds(
    small_disk: Path, form_and_data: tuple[Dialect, bytes], max_size: int | None
) -> None:
    form, data = form_and_data
    guard = _Guard(DISK_SIZE)
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as sandbox:
        patch.setattr(extract._Copier, "copy", guard.wrap(extract._Copier.copy))
        dest = Path(sandbox) / "dest"
        dest.mkdir()
        canary = Path(sandbox) / "canary"
        canary.mkdir()
        fd = os.open(small_disk, os.O_RDONLY)
        try:
            extract_stream(RawDisk(fd), io.BytesIO(data), dest=dest, max_size=max_size, dialect=form)
            ok = True
        except UntrustedData:
            ok = False
        finally:
            os.close(fd)
        assert not guard.bad
        assert sorted(os.listdir(sandbox)) == ["canary", "dest"]  # no staging left, nothing beside
        assert os.listdir(canary) == []
        if not ok:
            assert os.listdir(dest) == []
            return
        total = 0
        real_dest = os.path.realpath(dest)
        for path in _all_paths(str(dest)):
            assert not os.lstat(path).st_mode & 0o7000  # never setuid, setgid or sticky
            parent = os.path.realpath(os.path.dirname(path))
            assert parent == real_dest or parent.startswith(real_dest + os.sep)
            if os.path.islink(path):
                target = os.path.normpath(os.path.join(os.path.dirname(path), os.readlink(path)))
                assert target == real_dest or target.startswith(real_dest + os.sep)
            elif os.path.isfile(path):
                total += os.path.getsize(path)
        assert total <= (DISK_SIZE if max_size is None else max_size)


def test_a_failure_while_moving_into_place_takes_back_what_was_moved(
    small_disk: Path, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = extract._rename_noreplace
    calls = []

    def flaky(src_fd: int, name: bytes, dst_fd: int) -> None:
        calls.append(name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(src_fd, name, dst_fd)

    monkeypatch.setattr(extract, "_rename_noreplace", flaky)
    fd = os.open(small_disk, os.O_RDONLY)
    try:
        with pytest.raises(InfraError, match="No space left"):
            extract_stream(RawDisk(fd), io.BytesIO(to_today(b"d a\nf b 0\nf c 0\nf d 0\n\n")), dest=dest)
    finally:
        os.close(fd)
    assert calls[:3] == [b"a", b"b", b"c"]
    assert leftovers(dest) == []
