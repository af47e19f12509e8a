"""Real filesystem images for the result-channel tests: ext4 and xfs images holding a tree of
awkward result files, their manifests written by cloudbuild and by obs-build's perl
computeblocklists while mounted (today's, from the peer copy in ../shared/peers/obs-build, and
Debian's 2021 package, the 2018 form), and the expected tree.

Loop devices and mounts are released in `finally`. Every tool used is required: a missing one
fails the test run instead of skipping it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloudbuild.disk import blocklist
from cloudbuild.disk.manifest import WRITE_FORMATS

OBS_BUILD = Path("/usr/lib/obs-build")  # Debian's 2021 package: the 2018 form (scripts/setup --test)
COMPUTEBLOCKLISTS = OBS_BUILD / "computeblocklists"
EXTRACTBUILD = OBS_BUILD / "extractbuild"
# today's obs-build (inline mtimes), run as a peer and never copied into the project: the
# workspace's ../shared/peers/obs-build (beside the checkout, or /work/shared for a worktree)
_PEER_CANDIDATES = [
    Path(__file__).resolve().parents[3] / "shared" / "peers" / "obs-build",
    Path("/work/shared/peers/obs-build"),
]
PEER = Path(
    os.environ.get("CLOUDBUILD_OBS_BUILD_PEER")
    or next(
        (str(p) for p in _PEER_CANDIDATES if (p / "computeblocklists").is_file()), str(_PEER_CANDIDATES[0])
    )
)
PEER_COMPUTEBLOCKLISTS = PEER / "computeblocklists"
PEER_EXTRACTBUILD = PEER / "extractbuild"
PAD = 512
MIB = 1024 * 1024

# names that exercise the escaping: space, %, newline, tab, high bytes, a literal "%2F"
ODD_NAMES = [
    b"we ird%\nname",
    b"tab\there",
    b"%41 literal",
    b"high\xff\xfebytes",
    b" leading space",
    b"trailing space ",
    b"a%2Fb",
    b"-dash",
    b"\x01ctrl\x1f",
]


def require_tool(name: str) -> str:
    path = shutil.which(name) or (str(OBS_BUILD / name) if (OBS_BUILD / name).exists() else None)
    if path is None:
        pytest.fail(f"required tool {name} is missing (install obs-build, xfsprogs, qemu-utils, e2fsprogs)")
    return path


def run(argv: list[str | os.PathLike[str]], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([os.fspath(a) for a in argv], check=True, capture_output=True, **kwargs)  # type: ignore[call-overload, no-any-return]


@contextlib.contextmanager
def mounted(image: Path, mountpoint: Path, *, readonly: bool = False) -> Iterator[Path]:
    """Attach `image` to a loop device and mount it; always unmount and detach afterwards."""
    mountpoint.mkdir(exist_ok=True)
    device = (
        run(["losetup", "--find", "--show", *(["--read-only"] if readonly else []), image])
        .stdout.decode()
        .strip()
    )
    try:
        run(["mount", *(["-o", "ro"] if readonly else []), device, mountpoint])
        try:
            yield mountpoint
        finally:
            run(["umount", mountpoint])
    finally:
        run(["losetup", "-d", device])


def make_fs(image: Path, fstype: str, size_mib: int) -> None:
    """A filesystem on an image pre-filled with 0xAA, without discard: blocks never written read
    as 0xAA, so a hole or unwritten extent copied from the disk would show."""
    with open(image, "wb") as f:
        chunk = b"\xaa" * MIB
        for _ in range(size_mib):
            f.write(chunk)
    if fstype == "ext4":
        run([require_tool("mkfs.ext4"), "-q", "-F", "-E", "nodiscard", image])
    else:
        run([require_tool("mkfs.xfs"), "-q", "-f", "-K", image])


def populate(root: Path) -> None:
    """Result tree under root/out and root/OTHER, with fixed mtimes."""
    out = root / "out"
    (out / "sub" / "deeper").mkdir(parents=True)
    (out / "emptydir").mkdir()
    (root / "OTHER").mkdir()
    rnd = os.urandom
    (out / "big").write_bytes(rnd(5 * MIB + 123))
    (out / "small").write_bytes(b"hello\n")
    (out / "empty").write_bytes(b"")
    with open(out / "sparse", "wb") as f:  # data, hole, data, trailing hole
        f.write(rnd(5000))
        f.seek(300_000)
        f.write(rnd(7000))
        f.truncate(MIB + 17)
    with open(out / "hole_head", "wb") as f:
        f.seek(2 * MIB)
        f.write(b"tail")
    fd = os.open(out / "unwritten", os.O_CREAT | os.O_WRONLY, 0o644)
    os.posix_fallocate(fd, 0, 100_000)  # allocated, never written: must read back as zeros
    os.close(fd)
    fd = os.open(out / "mixed_unwritten", os.O_CREAT | os.O_RDWR, 0o644)
    os.posix_fallocate(fd, 0, 256 * 1024)
    os.pwrite(fd, rnd(4096), 65536)
    os.close(fd)
    with open(out / "prealloc_past_eof", "wb") as f:
        f.write(rnd(10_000))
        f.flush()
        run(["fallocate", "--keep-size", "-o", "0", "-l", str(MIB), out / "prealloc_past_eof"])
    with open(out / "fragmented", "wb") as f1, open(out / "sub" / "interleaved", "wb") as f2:
        for _ in range(16):  # interleaved synced appends: several extents per file
            for f in (f1, f2):
                f.write(rnd(40_000))
                f.flush()
                os.fsync(f.fileno())
    for i, name in enumerate(ODD_NAMES):
        (out / os.fsdecode(name)).write_bytes(b"odd %d\n" % i)
    (root / "OTHER" / "_statistics").write_bytes(b"MAX_mb_used_on_disk: 1\n")
    os.symlink("../big", out / "sub" / "link")
    os.symlink("sub/deeper", out / "dirlink")
    os.symlink("../../small", out / "sub" / "deeper" / "up")
    os.symlink(os.fsdecode(b"we ird%\nname"), out / "oddlink")
    os.symlink("/etc/passwd", out / "bad_absolute")  # skipped by the writers, with a warning
    os.symlink("../../escape", out / "bad_escape")
    # permission bits (set before the mtimes: chmod changes no mtime)
    (out / "tool").write_bytes(b"#!/bin/sh\necho tool\n")
    os.chmod(out / "tool", 0o755)
    (out / "secret").write_bytes(b"s3cret\n")
    os.chmod(out / "secret", 0o600)
    (out / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(out / "suid", 0o4755)  # the writer drops setuid: it comes back 0755
    (out / "private" / "readonly").mkdir(parents=True)
    (out / "private" / "readonly" / "inner").write_bytes(b"inner\n")
    os.chmod(out / "private" / "readonly" / "inner", 0o444)
    os.chmod(out / "private" / "readonly", 0o555)  # filled by the extractor before it is made read-only
    os.chmod(out / "private", 0o700)
    mtime = 1_000_000_000
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames]:
            mtime += 7
            os.utime(os.path.join(dirpath, name), (mtime, mtime), follow_symlinks=False)


# name -> (type, content: (size, sha256) / symlink target / None, mode or None, mtime or None)
Snapshot = dict[bytes, tuple[str, object, int | None, int | None]]


def snapshot(root: Path, *, mtimes: bool = True, modes: bool = True) -> Snapshot:
    """Every entry below root: type, content digest and size or target, (optionally) the mode of
    files and directories (all of S_IMODE: setuid & co. show) and the mtime."""
    result: Snapshot = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, base)
            st = os.lstat(path)
            mt = int(st.st_mtime) if mtimes else None
            mode = stat.S_IMODE(st.st_mode) if modes else None
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("l", os.readlink(path), None, mt)
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("d", None, mode, mt)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                result[rel] = ("f", (st.st_size, digest), mode, mt)
            else:
                result[rel] = ("?", None, None, None)
    return result


def reduced(snap: Snapshot, *, mtimes: bool = True, modes: bool = True) -> Snapshot:
    """`snap` without its mtimes and/or modes (for manifests that carry none)."""
    return {
        name: (kind, content, mode if modes else None, mtime if mtimes else None)
        for name, (kind, content, mode, mtime) in snap.items()
    }


def result_names(root: Path) -> list[bytes]:
    """What the guest's `find out OTHER` lists, in find's order."""
    found = run(["find", "out", "OTHER", "-print0"], cwd=root).stdout
    return [name for name in found.split(b"\0") if name]


def raw_extents(path: Path) -> list[tuple[int, int, int]]:
    """(physical, length, flags) of every FIEMAP extent of `path`, whatever its flags."""
    head, ext = blocklist._FIEMAP_HEAD, blocklist._FIEMAP_EXTENT
    buf = bytearray(head.size + ext.size * 64)
    head.pack_into(buf, 0, 0, 1 << 62, blocklist.FIEMAP_FLAG_SYNC, 0, 64, 0)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.ioctl(fd, blocklist.FS_IOC_FIEMAP, buf, True)
    finally:
        os.close(fd)
    count = head.unpack_from(buf, 0)[3]
    result = []
    for i in range(count):
        _, physical, length, _, _, flags, *_ = ext.unpack_from(buf, head.size + i * ext.size)
        result.append((physical, length, flags))
    return result


def swap_image(manifest: bytes) -> bytes:
    """The swap disk as the host finds it: BUILDSTATUS over the pad, manifest, old swap garbage."""
    data = bytearray(manifest)
    data[:12] = b"BUILDSTATUS0"
    return bytes(data) + os.urandom(4096)


@dataclass
class ResultDisk:
    fstype: str
    image: Path
    expected: Snapshot  # the result tree (bad symlinks excluded), with mtimes and modes (0777 bits)
    # manifest flavour -> swap image: perl (today's), perl-2018 (Debian's), fibmap, each WRITE_FORMATS
    swaps: dict[str, Path]
    manifests: dict[str, bytes]
    blksize: int
    unwritten: list[tuple[int, int, int]]  # out/unwritten's FIEMAP extents: physical, length, flags


def require_peer() -> None:
    for script in (PEER_COMPUTEBLOCKLISTS, PEER_EXTRACTBUILD):
        if not script.is_file():
            pytest.fail(
                f"{script} is missing: set CLOUDBUILD_OBS_BUILD_PEER to a folder with today's obs-build scripts"
            )


def _build(fstype: str, workdir: Path) -> ResultDisk:
    require_tool("perl")
    require_peer()
    image = workdir / f"{fstype}.img"
    make_fs(image, fstype, 64 if fstype == "ext4" else 320)
    manifests: dict[str, bytes] = {}
    with mounted(image, workdir / "mnt") as mnt:
        populate(mnt)
        os.sync()
        names = result_names(mnt)
        listing = b"\0".join(names) + b"\0"
        for flavour, script in (("perl", PEER_COMPUTEBLOCKLISTS), ("perl-2018", COMPUTEBLOCKLISTS)):
            manifests[flavour] = run(
                ["perl", script, "--padstart", str(PAD), "--padend", str(PAD), "--manifest", "-", "-0"],
                cwd=mnt,
                input=listing,
            ).stdout
        for fmt in WRITE_FORMATS:
            manifests[fmt] = run(
                [
                    sys.executable,
                    "-m",
                    "cloudbuild.commands.blocklist",
                    "--padstart",
                    str(PAD),
                    "--padend",
                    str(PAD),
                    "--manifest",
                    "-",
                    "-0",
                    "--format",
                    fmt,
                ],
                cwd=mnt,
                input=listing,
            ).stdout
        manifests["fibmap"] = run(
            [
                sys.executable,
                "-m",
                "cloudbuild.commands.blocklist",
                "--padstart",
                str(PAD),
                "--padend",
                str(PAD),
                "--fibmap",
                "--format",
                "obs",
                *[os.fsdecode(n) for n in names],
            ],
            cwd=mnt,
        ).stdout
        fd = os.open(mnt / "out" / "big", os.O_RDONLY)
        try:
            blksize = blocklist.block_size(fd)
        finally:
            os.close(fd)
        unwritten = raw_extents(mnt / "out" / "unwritten")
        expected = {k: v for k, v in snapshot(mnt).items() if k.split(b"/")[0] in (b"out", b"OTHER")}
    assert expected[b"out/suid"][2] == 0o4755
    # only the permission bits come back (never setuid, setgid, sticky)
    expected = {k: (t, c, None if m is None else m & 0o777, mt) for k, (t, c, m, mt) in expected.items()}
    # stale data under the unwritten extents (mkfs may have zeroed them): what a reused disk holds
    fd = os.open(image, os.O_WRONLY)
    try:
        for physical, length, _flags in unwritten:
            os.pwrite(fd, b"\xaa" * length, physical)
    finally:
        os.close(fd)
    for bad in (b"out/bad_absolute", b"out/bad_escape"):
        del expected[bad]
    swaps = {}
    for flavour, data in manifests.items():
        swaps[flavour] = workdir / f"{fstype}.swap.{flavour}"
        swaps[flavour].write_bytes(swap_image(data))
    return ResultDisk(fstype, image, expected, swaps, manifests, blksize, unwritten)


@pytest.fixture(scope="session", params=["ext4", "xfs"])
def result_disk(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ResultDisk:
    fstype: str = request.param
    return _build(fstype, tmp_path_factory.mktemp(f"disk-{fstype}"))


@pytest.fixture()
def dest(tmp_path: Path) -> Path:
    """An empty destination directory alone in its parent (so leftovers beside it show)."""
    d = tmp_path / "sandbox" / "dest"
    d.mkdir(parents=True)
    return d


def leftovers(dest: Path) -> list[str]:
    """Anything in dest or beside it (staging directories) after a failed extraction."""
    return sorted(os.listdir(dest)) + sorted(n for n in os.listdir(dest.parent) if n != dest.name)
