"""Read-only access to a qcow2 image's guest-visible bytes, without qemu-nbd.

Only what result extraction needs: the header (versions 2 and 3), the L1 table and L2 tables
read on demand, and a map from guest byte ranges to host file ranges. Unallocated and
all-zero clusters read as zeros. Compressed clusters, encryption, backing files, external
data files and extended L2 entries are refused with UntrustedData; so is anything that points
outside the image file or its virtual size.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from collections.abc import Iterator

from cloudbuild.errors import UntrustedData

MAGIC = 0x514649FB  # "QFI\xfb"
_HEADER_V2 = struct.Struct(">IIQIIQIIQQIIQ")  # 72 bytes
_HEADER_V3 = struct.Struct(">QQQII")  # 32 more bytes

INCOMPAT_DIRTY = 1 << 0  # refcounts may be stale: irrelevant for reading
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3  # only matters for compressed clusters, which are refused anyway
INCOMPAT_EXTL2 = 1 << 4
_INCOMPAT_OK = INCOMPAT_DIRTY | INCOMPAT_COMPRESSION

_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # bits 9-55
_L1_RESERVED = 0x7F00_0000_0000_01FF
_L2_COMPRESSED = 1 << 62
_L2_RESERVED = 0x3F00_0000_0000_01FE
_L2_ZERO = 1
_MAX_L1_BYTES = 32 * 1024 * 1024  # qemu's own limit
_L2_CACHE_BYTES = 32 * 1024 * 1024


def _read(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise UntrustedData(f"qcow2: image ends inside a table at byte {offset}")
        data += more
    return data


class Qcow2Image:
    """The guest view of the qcow2 image open on `fd` (read-only, not owned: the caller closes it)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.file_size = os.fstat(fd).st_size
        head = os.pread(fd, _HEADER_V2.size, 0)
        if len(head) < _HEADER_V2.size:
            raise UntrustedData("qcow2: image shorter than a qcow2 header")
        (
            magic,
            version,
            backing_offset,
            _backing_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_offset,
            *_,
        ) = _HEADER_V2.unpack(head)
        if magic != MAGIC:
            raise UntrustedData("qcow2: not a qcow2 image (bad magic); drop --qcow2 for a raw image")
        if version not in (2, 3):
            raise UntrustedData(f"qcow2: unsupported version {version} (2 and 3 are)")
        if not 9 <= cluster_bits <= 21:
            raise UntrustedData(f"qcow2: illegal cluster bits {cluster_bits}")
        if crypt_method:
            raise UntrustedData("qcow2: encrypted images are not supported")
        if backing_offset:
            raise UntrustedData(
                "qcow2: images with a backing file are not supported; flatten it with `qemu-img convert -O qcow2`"
            )
        if version == 3:
            incompat, _compat, _autoclear, _refcount_order, header_length = _HEADER_V3.unpack(
                _read(fd, _HEADER_V3.size, _HEADER_V2.size)
            )
            if header_length < _HEADER_V2.size + _HEADER_V3.size:
                raise UntrustedData(f"qcow2: bad header length {header_length}")
            if incompat & INCOMPAT_CORRUPT:
                raise UntrustedData("qcow2: image is marked corrupt")
            if incompat & INCOMPAT_DATA_FILE:
                raise UntrustedData("qcow2: images with an external data file are not supported")
            if incompat & INCOMPAT_EXTL2:
                raise UntrustedData("qcow2: extended L2 entries (subclusters) are not supported")
            if incompat & ~_INCOMPAT_OK:
                raise UntrustedData(f"qcow2: unknown incompatible features {incompat:#x}")
        self.version = version
        self.cluster_bits = cluster_bits
        self.cluster_size = 1 << cluster_bits
        self.l2_bits = cluster_bits - 3
        self.size = size
        # what the image can hold: the default limit on extracted bytes (the header's virtual size
        # is the guest's claim; 2**60 would let a sparse manifest entry run for days)
        self.data_limit = self.file_size
        l2_span = self.cluster_size << self.l2_bits  # guest bytes one L2 table maps
        needed = (size + l2_span - 1) // l2_span
        if l1_size < needed:
            raise UntrustedData(f"qcow2: L1 table of {l1_size} entries cannot map {size} bytes")
        if l1_size * 8 > _MAX_L1_BYTES:
            raise UntrustedData(f"qcow2: L1 table of {l1_size} entries is too large")
        if l1_offset % self.cluster_size or l1_offset + 8 * needed > self.file_size:
            raise UntrustedData("qcow2: L1 table outside the image")
        raw = _read(fd, 8 * needed, l1_offset) if needed else b""
        self._l1 = struct.unpack(f">{needed}Q", raw)
        self._l2_cache: OrderedDict[int, bytes] = OrderedDict()
        self._l2_cache_max = max(1, _L2_CACHE_BYTES // self.cluster_size)

    def _l2_table(self, l1_index: int) -> bytes | None:
        table = self._l2_cache.get(l1_index)
        if table is not None:
            self._l2_cache.move_to_end(l1_index)
            return table
        entry = self._l1[l1_index]
        if entry & _L1_RESERVED:
            raise UntrustedData(f"qcow2: bad L1 entry {l1_index}")
        offset = entry & _OFFSET_MASK
        if offset == 0:
            return None
        if offset % self.cluster_size or offset + self.cluster_size > self.file_size:
            raise UntrustedData(f"qcow2: L2 table {l1_index} outside the image")
        table = _read(self.fd, self.cluster_size, offset)
        self._l2_cache[l1_index] = table
        if len(self._l2_cache) > self._l2_cache_max:
            self._l2_cache.popitem(last=False)
        return table

    def _unmapped_span(self, vcluster: int) -> int:
        """Clusters from `vcluster` to the end of its L2 table's span when that table is absent
        (all zeros: mapped in one step, not cluster by cluster), else 0."""
        l1_index = vcluster >> self.l2_bits
        if l1_index < len(self._l1) and self._l1[l1_index] & _OFFSET_MASK == 0:
            if self._l1[l1_index] & _L1_RESERVED:
                raise UntrustedData(f"qcow2: bad L1 entry {l1_index}")
            span: int = ((l1_index + 1) << self.l2_bits) - vcluster
            return span
        return 0

    def _cluster(self, vcluster: int) -> int | None:
        """Host offset of guest cluster `vcluster`, None if it reads as zeros."""
        table = self._l2_table(vcluster >> self.l2_bits)
        if table is None:
            return None
        (entry,) = struct.unpack_from(">Q", table, 8 * (vcluster & ((1 << self.l2_bits) - 1)))
        if entry & _L2_COMPRESSED:
            raise UntrustedData(
                "qcow2: compressed clusters are not supported; recompress with `qemu-img convert -O qcow2` (no -c)"
            )
        if entry & _L2_RESERVED:
            raise UntrustedData(f"qcow2: bad L2 entry for cluster {vcluster}")
        if self.version == 3 and entry & _L2_ZERO:
            return None
        if self.version == 2 and entry & _L2_ZERO:
            raise UntrustedData(f"qcow2: bad L2 entry for cluster {vcluster}")
        offset: int = entry & _OFFSET_MASK
        if offset == 0:
            return None  # unallocated, no backing file: zeros
        if offset % self.cluster_size or offset + self.cluster_size > self.file_size:
            raise UntrustedData(f"qcow2: data cluster {vcluster} outside the image")
        return offset

    def map(self, offset: int, length: int) -> Iterator[tuple[int | None, int]]:
        """(host offset or None for zeros, length) pieces covering guest bytes offset..offset+length,
        host-contiguous clusters coalesced."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UntrustedData(
                f"qcow2: read of {length} bytes at {offset} outside the {self.size}-byte disk"
            )
        pending_host: int | None = None
        pending_len = 0
        end = offset + length
        while offset < end:
            vcluster, within = divmod(offset, self.cluster_size)
            span = self._unmapped_span(vcluster)
            if span:
                piece = min(span * self.cluster_size - within, end - offset)
                host = None
            else:
                piece = min(self.cluster_size - within, end - offset)
                host = self._cluster(vcluster)
                host = None if host is None else host + within
            if pending_len and (
                (host is None and pending_host is None)
                or (host is not None and pending_host is not None and pending_host + pending_len == host)
            ):
                pending_len += piece
            else:
                if pending_len:
                    yield pending_host, pending_len
                pending_host, pending_len = host, piece
            offset += piece
        if pending_len:
            yield pending_host, pending_len
