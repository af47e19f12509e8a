"""`cloudbuild extract`: the host side of the result channel (obs-build's extractbuild).

Copies the result files straight out of the raw (or qcow2) root disk by the manifest the guest
wrote onto the swap disk, never mounting a filesystem the guest wrote. The manifest is hostile
input: `cloudbuild.disk.manifest` parses it strictly; here every entry is created below a private
staging directory through directory file descriptors (mkdirat/openat with O_EXCL|O_NOFOLLOW,
symlinkat), every read is bounded by the disk, every byte written by `max_size`, and only a
complete extraction is moved into the destination. Mtimes and permission bits (0777 only, never
setuid/setgid/sticky) come from the manifest's trailers; directory modes are set last. Anything
wrong raises UntrustedData (exit 3) and leaves nothing new in the destination. docs/results.md
has the threat model.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from cloudbuild.deadline import Deadline
from cloudbuild.disk import manifest
from cloudbuild.disk.manifest import DEFAULT_LIMITS, Dialect, Limits
from cloudbuild.disk.qcow2 import Qcow2Image
from cloudbuild.errors import CloudbuildError, InfraError, UntrustedData, UsageError
from cloudbuild.log import get_logger

_COPY_CHUNK = 256 << 20  # per copy_file_range/sendfile call (the deadline is checked between calls)
_BUFFER = 8 << 20  # for the pread/pwrite fallback
_PREFETCH_MIN = 1 << 20
_PREFETCH_ENTRIES = 32  # manifest entries parsed ahead of the one being extracted
_PREFETCH_BYTES = 256 << 20  # disk bytes announced ahead
_PREFETCH_TEXT = 4 << 20  # extent text held ahead
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHMOD_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a file we wrote, to fchmod
# errors the manifest's content can provoke while creating entries (the rest are the host's)
_CONTENT_ERRNOS = {errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.ELOOP, errno.ENAMETOOLONG, errno.EINVAL}


@dataclass(frozen=True)
class ExtractReport:
    files: int
    dirs: int
    symlinks: int
    bytes: int
    skipped: int  # symlinks dropped because they would leave `dest_subtree`  # logical size of all files, holes included
    copied: int  # bytes read from the disk
    seconds: float


class DiskSource(Protocol):
    """Guest-visible bytes of a disk: `fd` to copy from and where each range lives in it.
    `data_limit` is the default limit on the bytes of all results: what the image can really
    hold (a qcow2 header's virtual size is the guest's claim, its file size is not)."""

    fd: int
    size: int
    data_limit: int

    def map(self, offset: int, length: int) -> Iterator[tuple[int | None, int]]: ...


class RawDisk:
    """A raw image file or block device."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.lseek(fd, 0, os.SEEK_END)
        self.data_limit = self.size

    def map(self, offset: int, length: int) -> Iterator[tuple[int | None, int]]:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UntrustedData(f"read of {length} bytes at {offset} outside the {self.size}-byte disk")
        yield offset, length


class _Copier:
    """Disk -> file copies in the kernel where it can: copy_file_range (same filesystem type;
    reflinks on xfs/btrfs), else sendfile (block devices), else large pread/pwrite."""

    def __init__(self, deadline: Deadline | None = None) -> None:
        self.mode = "copy_file_range"
        self.deadline = deadline
        self._buffer: bytearray | None = None

    def check(self) -> None:
        """Stop at the deadline: a guest must not hold a worker slot by making extraction slow."""
        if self.deadline is not None:
            self.deadline.check()

    def copy(self, src: int, src_off: int, dst: int, dst_off: int, length: int) -> None:
        while length > 0:
            self.check()
            count = min(length, _COPY_CHUNK)
            done = self._once(src, src_off, dst, dst_off, count)
            if done <= 0:
                raise InfraError(f"disk read returned nothing at byte {src_off}")
            src_off += done
            dst_off += done
            length -= done

    def _once(self, src: int, src_off: int, dst: int, dst_off: int, count: int) -> int:
        if self.mode == "copy_file_range":
            try:
                return os.copy_file_range(src, dst, count, src_off, dst_off)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF):
                    raise
                self.mode = "sendfile"
        if self.mode == "sendfile":
            try:
                os.lseek(dst, dst_off, os.SEEK_SET)
                return os.sendfile(dst, src, src_off, count)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                self.mode = "pread"
        if self._buffer is None:
            self._buffer = bytearray(_BUFFER)
        view = memoryview(self._buffer)[: min(count, _BUFFER)]
        got = os.preadv(src, [view], src_off)
        written = 0
        while written < got:
            written += os.pwrite(dst, view[written:got], dst_off + written)
        return got


class _Tree:
    """Directory fds below the staging root, opened component by component with O_NOFOLLOW;
    only the chain of the last directory used is kept open (bounded by the manifest's depth)."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._fds: dict[bytes, int] = {}

    def fd(self, path: bytes) -> int:
        if not path:
            return self.root_fd
        fd = self._fds.get(path)
        if fd is not None:
            return fd
        parent, _, base = path.rpartition(b"/")
        if len(self._fds) > 512:
            self._trim(path)
        fd = os.open(base, _DIR_FLAGS, dir_fd=self.fd(parent))
        self._fds[path] = fd
        return fd

    def _trim(self, keep: bytes) -> None:
        for path in list(self._fds):
            if not (keep + b"/").startswith(path + b"/"):
                os.close(self._fds.pop(path))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _print_name(name: bytes) -> None:
    """Names are bytes (any but NUL and '/'-rules): written raw, never through an encoder."""
    out = getattr(sys.stdout, "buffer", None)
    if out is not None:
        sys.stdout.flush()
        out.write(name + b"\n")
        out.flush()
    else:
        print(name.decode("utf-8", "backslashreplace"))


def _split(name: bytes) -> tuple[bytes, bytes]:
    parent, _, base = name.rpartition(b"/")
    return parent, base


def _ns(mtime: int) -> tuple[int, int]:
    return (mtime * 1_000_000_000, mtime * 1_000_000_000)


def _show(name: bytes) -> str:
    return repr(name.decode("utf-8", "backslashreplace")[:200])


def _chmod(parent_fd: int, base: bytes, mode: int, flags: int) -> None:
    """fchmod through an O_NOFOLLOW fd: never through a symlink, no /proc needed."""
    fd = os.open(base, flags, dir_fd=parent_fd)
    try:
        os.fchmod(fd, mode & manifest.PERMISSIONS)
    finally:
        os.close(fd)


def _os_error(exc: OSError, what: str) -> CloudbuildError:
    if exc.errno in _CONTENT_ERRNOS:
        return UntrustedData(f"{what}: {exc.strerror}")
    return InfraError(f"{what}: {exc.strerror}")


@dataclass
class Staged:
    """What is left to do once the entries exist: move `top` (the top-level names, in manifest
    order) into place, then restore the top-level `mtimes` (a move may touch a directory) and
    the directory modes `dir_modes` (deepest first; kept until the very end so that every
    directory stays writable and traversable while anything is still created or moved)."""

    top: list[bytes]
    mtimes: dict[bytes, int]
    dir_modes: list[tuple[bytes, int]]


def extract_into(
    disk: DiskSource,
    stream: BinaryIO,
    root_fd: int,
    *,
    max_size: int,
    dialect: Dialect = manifest.DEFAULT_DIALECT,
    limits: Limits = DEFAULT_LIMITS,
    verbose: int = 0,
    deadline: Deadline | None = None,
    dest_subtree: bytes | None = None,
) -> tuple[ExtractReport, Staged]:
    """Create the manifest's entries below the (empty, private) directory `root_fd`, with their
    mtimes and the modes of files (directory modes are left to the caller, see `Staged`).

    `dest_subtree` names the manifest folder that the caller turns into its destination (the VM
    flow's `results`): a symlink inside it whose target would leave it is dropped with a warning,
    the rule the directory channel applies (`manifest.symlink_problem` relative to that folder). `deadline` is checked between
    entries and copy calls (DeadlineExceeded, exit 3).

    Raises UntrustedData on anything hostile or malformed; the caller owns the cleanup of
    `root_fd`'s contents.
    """
    started = time.monotonic()
    tree = _Tree(root_fd)
    copier = _Copier(deadline)
    files = dirs = symlinks = total = copied = skipped = 0
    dropped: set[bytes] = set()
    subtree = None if dest_subtree is None else dest_subtree + b"/"
    top: list[bytes] = []
    late_mtimes: list[tuple[bytes, int]] = []  # directories and trailer entries: set at the very end
    dir_modes: list[tuple[bytes, int]] = []
    try:
        for entry in _prefetched(manifest.parse(stream, dialect=dialect, limits=limits), disk):
            copier.check()
            if isinstance(entry, manifest.Mtime):
                if entry.name in dropped:
                    continue
                late_mtimes.append((entry.name, entry.mtime))
                continue
            if isinstance(entry, manifest.Mode):
                if entry.directory:
                    dir_modes.append((entry.name, entry.mode & manifest.PERMISSIONS))
                    continue
                parent, base = _split(entry.name)
                try:  # the file is complete (trailers follow all entries): its mode can be set now
                    _chmod(tree.fd(parent), base, entry.mode, _CHMOD_FLAGS)
                except OSError as exc:
                    raise _os_error(exc, f"setting the mode of {_show(entry.name)}") from None
                continue
            parent, base = _split(entry.name)
            if not parent:
                top.append(entry.name)
            if verbose:
                _print_name(entry.name)
            try:
                parent_fd = tree.fd(parent)
                if isinstance(entry, manifest.Dir):
                    os.mkdir(base, 0o777, dir_fd=parent_fd)
                    dirs += 1
                    if entry.mtime is not None:
                        late_mtimes.append((entry.name, entry.mtime))
                elif isinstance(entry, manifest.Symlink):
                    if subtree is not None and entry.name.startswith(subtree):
                        # the one link rule of both result channels (dircopy applies it too)
                        problem = manifest.symlink_problem(entry.name[len(subtree) :], entry.target)
                        if problem:
                            get_logger(__name__).warning(
                                "result symlink dropped", name=_show(entry.name), reason=problem
                            )
                            dropped.add(entry.name)
                            skipped += 1
                            continue
                    os.symlink(entry.target, base, dir_fd=parent_fd)
                    symlinks += 1
                    if entry.mtime is not None:
                        os.utime(base, ns=_ns(entry.mtime), dir_fd=parent_fd, follow_symlinks=False)
                else:
                    if entry.size > max_size - total:
                        raise UntrustedData(
                            f"{_show(entry.name)}: {entry.size} bytes would pass the limit of {max_size} bytes in all"
                        )
                    total += entry.size
                    copied += _write_file(disk, copier, entry, base, parent_fd)
                    files += 1
            except OSError as exc:
                raise _os_error(exc, f"creating {_show(entry.name)}") from None
        top_mtimes: dict[bytes, int] = {}
        for name, mtime in late_mtimes:
            parent, base = _split(name)
            try:
                os.utime(base, ns=_ns(mtime), dir_fd=tree.fd(parent), follow_symlinks=False)
            except OSError as exc:
                raise _os_error(exc, f"setting the mtime of {_show(name)}") from None
            if not parent:
                top_mtimes[name] = mtime
    finally:
        tree.close()
    dir_modes.sort(key=lambda item: item[0].count(b"/"), reverse=True)  # deepest first (stable)
    report = ExtractReport(files, dirs, symlinks, total, skipped, copied, time.monotonic() - started)
    return report, Staged(top, top_mtimes, dir_modes)


def _announce(disk: DiskSource, entry: manifest.File, budget: int) -> int:
    """POSIX_FADV_WILLNEED for the first `budget` bytes of entry's data; the bytes announced.
    Only a hint: a bad entry announces nothing here and is refused when its turn comes."""
    announced = 0
    try:
        for run in entry.runs(disk_size=disk.size):
            if run.offset is None:
                continue
            for host, length in disk.map(run.offset, run.length):
                if host is not None:
                    length = min(length, budget - announced)
                    if length <= 0:  # (a length of 0 would mean "to the end of the disk")
                        return announced
                    os.posix_fadvise(disk.fd, host, length, os.POSIX_FADV_WILLNEED)
                    announced += length
                if announced >= budget:
                    return announced
    except (UntrustedData, OSError):
        pass
    return announced


def _prefetched(entries: Iterator[manifest.Entry], disk: DiskSource) -> Iterator[manifest.Entry]:
    """The entries, in order, with the disk reads of the next few files announced while the
    current one is copied: the device always has the next file's reads queued. The window is
    bounded in entries, announced bytes and held extent text (memory stays one line's worth)."""
    window: deque[tuple[manifest.Entry, int, int]] = deque()
    ahead = held = 0
    more = True
    while True:
        while more and len(window) < _PREFETCH_ENTRIES and ahead < _PREFETCH_BYTES and held < _PREFETCH_TEXT:
            entry = next(entries, None)
            if entry is None:
                more = False
                break
            announced = text = 0
            if isinstance(entry, manifest.File) and entry.size:
                announced = _announce(disk, entry, _PREFETCH_BYTES - ahead)
                text = len(entry.extents)
            window.append((entry, announced, text))
            ahead += announced
            held += text
        if not window:
            return
        entry, announced, text = window.popleft()
        ahead -= announced
        held -= text
        yield entry


def _write_file(disk: DiskSource, copier: _Copier, entry: manifest.File, base: bytes, parent_fd: int) -> int:
    fd = os.open(base, _FILE_FLAGS, 0o666, dir_fd=parent_fd)
    copied = 0
    try:
        position = 0
        if entry.size:
            for run in entry.runs(disk_size=disk.size):
                if run.offset is not None:
                    for host, length in disk.map(run.offset, run.length):
                        copier.check()  # a qcow2 map of many small pieces is slow too
                        if host is not None:  # None: qcow2 zeros, left as a hole
                            if length >= _PREFETCH_MIN:
                                # queue the whole run's reads at once: the device sees a deep queue
                                # instead of the copy's readahead window
                                with contextlib.suppress(OSError):
                                    os.posix_fadvise(disk.fd, host, length, os.POSIX_FADV_WILLNEED)
                            copier.copy(disk.fd, host, fd, position, length)
                            copied += length
                        position += length
                else:
                    position += run.length
        os.ftruncate(fd, entry.size)  # trailing holes; and a file never ends up longer than its size
        if entry.mtime is not None:
            os.utime(fd, ns=_ns(entry.mtime))
    finally:
        os.close(fd)
    return copied


# ---------------------------------------------------------------------------------------------
# staging and moving into place

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int
_RENAME_NOREPLACE = 1


def _rename_noreplace(src_fd: int, name: bytes, dst_fd: int) -> None:
    if _renameat2 is not None:
        if _renameat2(src_fd, name, dst_fd, name, _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), os.fsdecode(name))
    # no RENAME_NOREPLACE here: check, then rename (the destination is the host's, not the guest's)
    try:
        os.lstat(name, dir_fd=dst_fd)
    except FileNotFoundError:
        os.rename(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(name))


STAGING_PREFIX = ".cloudbuild-extract-"


def _staging_dir(dest: Path) -> Path:
    """A private hidden directory inside dest: the only place from which a rename into dest is
    sure to work (beside dest, a mount point or a bind mount of the same filesystem makes the
    final rename fail with EXDEV, and `st_dev` cannot tell a bind mount). Its random name cannot
    be one the manifest names (a top-level name that exists in dest is refused anyway)."""
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=dest))


def _move_into_place(staging_fd: int, dest_fd: int, dest: Path, staged: Staged) -> None:
    top = staged.top
    for name in top:
        try:
            os.lstat(name, dir_fd=dest_fd)
        except FileNotFoundError:
            continue
        raise UntrustedData(f"{_show(name)} already exists in {dest}")
    moved: list[bytes] = []
    try:
        for name in top:
            _rename_noreplace(staging_fd, name, dest_fd)
            moved.append(name)
        for name, mtime in staged.mtimes.items():  # moving a directory may touch it
            os.utime(name, ns=_ns(mtime), dir_fd=dest_fd, follow_symlinks=False)
        # directory modes last, deepest first: until here every directory stays writable and
        # traversable (a read-only directory could neither be filled nor moved by a non-root
        # extractor); changing a mode changes no mtime
        tree = _Tree(dest_fd)
        try:
            for name, mode in staged.dir_modes:
                parent, base = _split(name)
                _chmod(tree.fd(parent), base, mode, _DIR_FLAGS)
        finally:
            tree.close()
    except OSError as exc:
        for name in reversed(moved):  # all or nothing: take back what was moved
            os.rename(name, name, src_dir_fd=dest_fd, dst_dir_fd=staging_fd)
        raise _os_error(exc, f"moving results into {dest}") from None


def extract_stream(
    disk: DiskSource,
    stream: BinaryIO,
    *,
    dest: Path,
    max_size: int | None = None,
    dialect: Dialect = manifest.DEFAULT_DIALECT,
    limits: Limits = DEFAULT_LIMITS,
    verbose: int = 0,
    deadline: Deadline | None = None,
    dest_subtree: bytes | None = None,
) -> ExtractReport:
    """Extract into the existing directory `dest` by the manifest read from `stream`: all or
    nothing (the staging folder inside `dest` is removed on every exit, an exception included)."""
    dest = Path(os.path.abspath(dest))
    if not dest.is_dir() or dest.is_symlink():
        raise UsageError(f"destination {dest} is not a directory")
    limit = disk.data_limit if max_size is None else max_size
    try:
        staging = _staging_dir(dest)
    except OSError as exc:
        raise InfraError(f"cannot create a staging directory for {dest}: {exc.strerror}") from None
    staging_fd = -1
    try:
        staging_fd = os.open(staging, _DIR_FLAGS)
        report, staged = extract_into(
            disk,
            stream,
            staging_fd,
            max_size=limit,
            dialect=dialect,
            limits=limits,
            verbose=verbose,
            deadline=deadline,
            dest_subtree=dest_subtree,
        )
        dest_fd = os.open(dest, _DIR_FLAGS)
        try:
            _move_into_place(staging_fd, dest_fd, dest, staged)
        finally:
            os.close(dest_fd)
    finally:
        if staging_fd >= 0:
            os.close(staging_fd)
        shutil.rmtree(staging, ignore_errors=True)
    get_logger(__name__).info(
        "extracted results",
        dest=str(dest),
        files=report.files,
        dirs=report.dirs,
        symlinks=report.symlinks,
        skipped=report.skipped,
        bytes=report.bytes,
        copied=report.copied,
        seconds=round(report.seconds, 3),
    )
    return report


MAX_SKIP = 1 << 40  # far more than any status pad; keeps seek() away from OverflowError


def skip_pad(stream: BinaryIO, skip: int) -> None:
    """Position `stream` after `skip` bytes of build status."""
    if not 0 <= skip <= MAX_SKIP:
        raise UsageError(f"--skip {skip}: must be between 0 and {MAX_SKIP} bytes")
    if not skip:
        return
    try:
        stream.seek(skip, os.SEEK_SET)
        return
    except (OSError, io.UnsupportedOperation):
        pass
    left = skip
    while left:
        chunk = stream.read(min(left, 1 << 16))
        if not chunk:
            raise UntrustedData(f"manifest source shorter than the {skip}-byte status pad")
        left -= len(chunk)


def open_disk(fd: int, *, qcow2: bool) -> DiskSource:
    return Qcow2Image(fd) if qcow2 else RawDisk(fd)


def extract_results(
    disk: Path,
    manifest_source: Path | BinaryIO,
    *,
    skip: int = 512,
    dest: Path,
    max_size: int | None = None,
    qcow2: bool = False,
    dialect: Dialect = manifest.DEFAULT_DIALECT,
    limits: Limits = DEFAULT_LIMITS,
    verbose: int = 0,
    deadline: Deadline | None = None,
    dest_subtree: bytes | None = None,
) -> ExtractReport:
    """Copy the results listed by the manifest on `manifest_source` (a path, or an open stream such
    as stdin; after `skip` bytes of build status) out of the root disk `disk` (raw image, block device, or qcow2 with `qcow2=True`) into
    the existing directory `dest`. At most `max_size` bytes in all (default: the image file's or
    device's size, never a qcow2 header's claim); `deadline` and `dest_subtree` as for `extract_into`.

    Raises UntrustedData (exit 3) on a malformed or hostile manifest or image, leaving nothing new
    in `dest`; UsageError if `dest` is not a directory; InfraError on host I/O errors.
    """
    try:
        disk_fd = os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise InfraError(f"cannot open disk {disk}: {exc.strerror}") from None
    try:
        source = open_disk(disk_fd, qcow2=qcow2)
        with contextlib.suppress(OSError):
            os.posix_fadvise(disk_fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        with contextlib.ExitStack() as closing:
            if isinstance(manifest_source, Path):
                try:
                    stream: BinaryIO = closing.enter_context(open(manifest_source, "rb", buffering=1 << 20))
                except OSError as exc:
                    raise InfraError(f"cannot open manifest {manifest_source}: {exc.strerror}") from None
            else:
                stream = manifest_source
            skip_pad(stream, skip)
            return extract_stream(
                source,
                stream,
                dest=dest,
                max_size=max_size,
                dialect=dialect,
                limits=limits,
                verbose=verbose,
                deadline=deadline,
                dest_subtree=dest_subtree,
            )
    finally:
        os.close(disk_fd)
