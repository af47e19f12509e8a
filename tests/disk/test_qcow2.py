"""qcow2 reading without qemu-nbd: guest bytes match qemu's view; unsupported images are refused."""

from __future__ import annotations

import os
import random
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudbuild.disk.qcow2 import Qcow2Image
from cloudbuild.errors import UntrustedData

from .conftest import require_tool, run

MIB = 1024 * 1024
FUZZ_EXAMPLES = int(os.environ.get("CLOUDBUILD_FUZZ_EXAMPLES", "200"))


def read_guest(image: Qcow2Image, offset: int, length: int) -> bytes:
    out = bytearray()
    for host, piece in image.map(offset, length):
        out += bytes(piece) if host is None else os.pread(image.fd, piece, host)
    return bytes(out)


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 MiB: random data with zero stretches (which qemu-img leaves unallocated)."""
    rng = random.Random(7)
    data = bytearray(rng.randbytes(4 * MIB))
    data[MIB : MIB + 300_000] = bytes(300_000)
    data[3 * MIB :] = bytes(MIB)
    path = tmp_path_factory.mktemp("qcow") / "disk.raw"
    path.write_bytes(bytes(data))
    return path


def convert(raw: Path, out: Path, *options: str) -> Path:
    run([require_tool("qemu-img"), "convert", "-f", "raw", "-O", "qcow2", *options, raw, out])
    return out


def open_image(path: Path) -> Qcow2Image:
    return Qcow2Image(os.open(path, os.O_RDONLY))


@pytest.mark.parametrize(
    "options",
    [
        ["-o", "compat=0.10"],
        ["-o", "compat=1.1"],
        ["-o", "cluster_size=512"],
        ["-o", "compat=1.1,cluster_size=2M"],
    ],
)
def test_guest_bytes_match_the_raw_disk(raw: Path, tmp_path: Path, options: list[str]) -> None:
    image = open_image(convert(raw, tmp_path / "d.qcow2", *options))
    data = raw.read_bytes()
    assert image.size == len(data)
    rng = random.Random(1)
    for _ in range(200):
        offset = rng.randrange(len(data))
        length = rng.randrange(min(len(data) - offset, 300_000) + 1)
        assert read_guest(image, offset, length) == data[offset : offset + length]
    assert read_guest(image, 0, len(data)) == data


def test_v3_zero_clusters_read_as_zeros(raw: Path, tmp_path: Path) -> None:
    path = convert(raw, tmp_path / "z.qcow2", "-o", "compat=1.1")
    run([require_tool("qemu-io"), "-f", "qcow2", "-c", "write -z 65536 65536", path])
    image = open_image(path)
    assert read_guest(image, 65536, 65536) == bytes(65536)
    assert read_guest(image, 0, 65536) == raw.read_bytes()[:65536]


def test_reads_outside_the_virtual_disk_are_refused(raw: Path, tmp_path: Path) -> None:
    image = open_image(convert(raw, tmp_path / "d.qcow2"))
    with pytest.raises(UntrustedData, match="outside"):
        list(image.map(4 * MIB - 10, 11))


def test_backing_file_is_refused(raw: Path, tmp_path: Path) -> None:
    base = convert(raw, tmp_path / "base.qcow2")
    overlay = tmp_path / "overlay.qcow2"
    run([require_tool("qemu-img"), "create", "-f", "qcow2", "-b", base, "-F", "qcow2", overlay])
    with pytest.raises(UntrustedData, match="backing file"):
        open_image(overlay)


def test_extended_l2_and_external_data_file_are_refused(tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    run([qemu_img, "create", "-f", "qcow2", "-o", "extended_l2=on", tmp_path / "ext.qcow2", "1M"])
    with pytest.raises(UntrustedData, match="subclusters"):
        open_image(tmp_path / "ext.qcow2")
    run(
        [
            qemu_img,
            "create",
            "-f",
            "qcow2",
            "-o",
            f"data_file={tmp_path / 'data.raw'}",
            tmp_path / "df.qcow2",
            "1M",
        ]
    )
    with pytest.raises(UntrustedData, match="external data file"):
        open_image(tmp_path / "df.qcow2")


def patched(src: Path, dst: Path, offset: int, fmt: str, value: int) -> Path:
    data = bytearray(src.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "match"),
    [
        (0, ">I", 0x12345678, "bad magic"),
        (4, ">I", 4, "version 4"),
        (20, ">I", 30, "cluster bits"),
        (32, ">I", 1, "encrypted"),
        (36, ">I", 0, "cannot map"),
        (36, ">I", 0x10000000, "too large"),
        (40, ">Q", 1 << 40, "L1 table outside"),
        (72, ">Q", 2, "marked corrupt"),
        (72, ">Q", 1 << 20, "unknown incompatible"),
    ],
)
def test_hostile_headers_are_refused(
    raw: Path, tmp_path: Path, offset: int, fmt: str, value: int, match: str
) -> None:
    good = convert(raw, tmp_path / "good.qcow2", "-o", "compat=1.1")
    with pytest.raises(UntrustedData, match=match):
        open_image(patched(good, tmp_path / "bad.qcow2", offset, fmt, value))


def test_hostile_l1_and_l2_entries_are_refused(raw: Path, tmp_path: Path) -> None:
    good = convert(raw, tmp_path / "good.qcow2", "-o", "compat=1.1")
    (l1_offset,) = struct.unpack_from(">Q", good.read_bytes(), 40)
    (l1_entry,) = struct.unpack_from(">Q", good.read_bytes(), l1_offset)
    l2_offset = l1_entry & 0x00FF_FFFF_FFFF_FE00
    cases = [
        (l1_offset, l1_entry | 0x10, "bad L1 entry"),  # reserved bits
        (l1_offset, (l1_entry & ~0x00FF_FFFF_FFFF_FE00) | (1 << 50), "outside the image"),
        (l2_offset, (1 << 63) | (1 << 50), "outside the image"),  # data cluster past the end
        (l2_offset, (1 << 63) | 0x200, "outside the image"),  # unaligned data cluster
        (l2_offset, (1 << 63) | (1 << 62), "compressed"),
        (l2_offset, (1 << 63) | 0x4, "bad L2 entry"),
    ]
    for offset, value, match in cases:
        image = open_image(patched(good, tmp_path / "bad.qcow2", offset, ">Q", value))
        with pytest.raises(UntrustedData, match=match):
            read_guest(image, 0, 4096)


@pytest.fixture(scope="module")
def small_qcow2(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 256 KiB disk with 512-byte clusters: header, L1 and L2 tables all in the first few KiB."""
    work = tmp_path_factory.mktemp("qfuzz")
    raw = work / "d.raw"
    raw.write_bytes(random.Random(3).randbytes(256 * 1024))
    return convert(raw, work / "d.qcow2", "-o", "compat=1.1,cluster_size=512").read_bytes()


@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(0, 8191), st.integers(0, 255)), min_size=1, max_size=8),
    offset=st.integers(0, 300 * 1024),
    length=st.integers(0, 64 * 1024),
)
def test_fuzz_mutated_images_fail_cleanly_and_read_inside_the_file(
    small_qcow2: bytes, edits: list[tuple[int, int]], offset: int, length: int
) -> None:
    data = bytearray(small_qcow2)
    for position, value in edits:
        data[position] = value
    with tempfile.NamedTemporaryFile() as f:
        f.write(bytes(data))
        f.flush()
        fd = os.open(f.name, os.O_RDONLY)
        try:
            image = Qcow2Image(fd)
            total = 0
            for host, piece in image.map(offset, length):
                assert piece > 0
                assert host is None or (host >= 0 and host + piece <= len(data))
                total += piece
            assert total == length
        except UntrustedData:
            pass
        finally:
            os.close(fd)
