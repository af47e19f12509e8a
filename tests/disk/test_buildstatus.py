"""BUILDSTATUS: `BUILDSTATUS<digit>` in the first 12 bytes of the swap disk, nothing else is a status."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudbuild.disk import buildstatus
from cloudbuild.disk.buildstatus import RECORD_LENGTH, encode, parse, read, write


@pytest.mark.parametrize("status", range(10))
def test_encode_is_obs_builds_record(status: int) -> None:
    assert encode(status) == f"BUILDSTATUS{status}".encode()
    assert len(encode(status)) == RECORD_LENGTH == 12


@pytest.mark.parametrize("status", [-1, 10, 255])
def test_encode_refuses_more_than_one_digit(status: int) -> None:
    with pytest.raises(ValueError, match="one digit"):
        encode(status)


@pytest.mark.parametrize("status", range(10))
def test_parse_reads_the_record_and_ignores_what_follows(status: int) -> None:
    assert parse(encode(status)) == status
    assert parse(encode(status) + b"\0" * 500 + b"SWAPSPACE2") == status
    assert parse(encode(status) + b"BUILDSTATUS9") == status


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"BUILDSTATUS",  # a short read: 11 bytes
        b"BUILDSTATUS ",
        b"BUILDSTATUSx",
        b"buildstatus0",
        b" BUILDSTATUS0",
        b"\0BUILDSTATUS0",
        b"BUILDSTATUS\xd9\xa3",  # an Arabic-Indic digit is no digit here
        b"\0" * 12,
        b"\xff" * 4096,
        b"SWAPSPACE2\0\0",
        b"BUILDSTAT",
    ],
)
def test_anything_else_is_no_status(head: bytes) -> None:
    assert parse(head) is None


@given(st.binary(max_size=64))
def test_parse_never_fails_and_only_believes_the_exact_record(data: bytes) -> None:
    result = parse(data)
    if result is None:
        assert not (data[:11] == b"BUILDSTATUS" and data[11:12].isdigit())
    else:
        assert 0 <= result <= 9
        assert data[:12] == encode(result)


def test_write_then_read_in_place_without_truncating(tmp_path: Path) -> None:
    swap = tmp_path / "swap.img"
    swap.write_bytes(b"\0" * 65536)
    write(swap, 2)
    assert read(swap) == 2
    assert swap.stat().st_size == 65536
    write(swap, 0)
    assert read(swap) == 0
    assert swap.read_bytes()[:13] == b"BUILDSTATUS0\0"


def test_read_of_a_fresh_or_garbage_swap_is_none(tmp_path: Path) -> None:
    swap = tmp_path / "swap.img"
    swap.write_bytes(b"\0" * 4096)
    assert read(swap) is None
    swap.write_bytes(b"garbage from the guest" * 100)
    assert read(swap) is None


@pytest.mark.parametrize("content", [b"", b"BUILD", b"BUILDSTATUS"])
def test_read_of_a_short_file_is_none(tmp_path: Path, content: bytes) -> None:
    swap = tmp_path / "swap.img"
    swap.write_bytes(content)
    assert read(swap) is None


def test_read_reads_only_the_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    swap = tmp_path / "swap.img"
    swap.write_bytes(encode(1) + b"x" * (1 << 20))
    lengths: list[int] = []
    real_pread = buildstatus.os.pread

    def pread(fd: int, length: int, offset: int) -> bytes:
        lengths.append(length)
        return real_pread(fd, length, offset)

    monkeypatch.setattr(buildstatus.os, "pread", pread)
    assert read(swap) == 1
    assert lengths == [RECORD_LENGTH]


def test_what_the_guest_shell_writes_is_read(tmp_path: Path) -> None:
    # obs-build's guest: echo -n "BUILDSTATUS$1" > "$VM_SWAP" (a block device: no truncation)
    from cloudbuild.runner import run

    swap = tmp_path / "swap.img"
    swap.write_bytes(b"\0" * 4096)
    run(["sh", "-c", 'printf %s "BUILDSTATUS$1" | dd of="$2" conv=notrunc status=none', "sh", "2", swap])
    assert read(swap) == 2
