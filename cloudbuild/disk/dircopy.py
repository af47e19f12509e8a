"""Copy build results out of a directory the guest controlled (chroot, lxc) as hostile input.

The build root of a `directory`-channel backend is a host folder that the recipe could change at
will, up to the very moment we read it (a process may outlive the build in a leaked namespace).
So the copy never resolves a path through the guest's tree:

- every directory is opened relative to its parent's fd with `O_NOFOLLOW | O_DIRECTORY`, every
  file with `O_NOFOLLOW | O_NONBLOCK`, and the opened object is checked with `fstat` to be the kind
  (and the inode) that `lstat` saw, so a swap to a symlink, fifo or device between the two is
  caught instead of followed;
- only regular files and directories are copied; symlinks are recreated as symlinks, never
  followed, and one the manifest's symlink rule refuses (`manifest.symlink_problem` relative to
  the result folder: absolute, `.` or empty components, `..` past the top or in the middle) is
  skipped with a warning: the one rule of both result channels (the swap channel's extractor
  applies it to the folder that becomes DEST); fifos, sockets and device nodes are
  skipped with a warning; hard links are copied as separate files (their content is inside the
  tree, it is the same data the guest could write anyway);
- setuid/setgid/sticky bits are dropped, owners are not copied (everything belongs to us);
- the bytes actually read (not `st_size`, which a file can outgrow) count against `max_size`; the
  number of entries, the bytes of their names (counted while the directory is read, before any
  sorting), the depth, and the total work of re-resolving symlinks (hops and target bytes) are
  bounded; a deadline is checked between entries and chunks;
- the copy is staged in a temporary folder beside `dest` and renamed into place at the end; on
  any error the stage is removed and `UntrustedData` is raised: nothing is left half-copied.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cloudbuild.deadline import Deadline
from cloudbuild.disk import manifest
from cloudbuild.errors import UntrustedData, UsageError
from cloudbuild.log import get_logger

log = get_logger(__name__)

CHUNK = 1024 * 1024
MAX_ENTRIES = 200_000
MAX_DEPTH = 64
MAX_LINK = 4096
MAX_NAME_BYTES = 64 * 1024 * 1024  # of all entry names together: memory stays bounded
MAX_RESOLVE_HOPS = 1_000_000  # symlinks followed re-resolving all links, in all
MAX_RESOLVE_BYTES = 16 * 1024 * 1024  # of link targets walked doing so

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


@dataclass
class CopyReport:
    """What `copy_results` copied and what it refused."""

    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)


@dataclass
class ResolveBudget:
    """The work all symlink re-resolutions of one copy may do together: a chain of long
    `x/../x/..` targets must not cost hours."""

    hops: int = MAX_RESOLVE_HOPS
    target_bytes: int = MAX_RESOLVE_BYTES

    def spend(self, target: str) -> None:
        self.hops -= 1
        self.target_bytes -= len(target)
        if self.hops < 0 or self.target_bytes < 0:
            raise UntrustedData("results: resolving the symlinks takes too much work (too many or too long links)")


class _Copier:
    def __init__(self, max_size: int, max_entries: int, max_depth: int, deadline: Deadline | None = None):
        self.max_size = max_size
        self.max_entries = max_entries
        self.max_depth = max_depth
        self.deadline = deadline
        self.report = CopyReport()
        self.entries = 0
        self.name_bytes = 0
        self.links: list[PurePosixPath] = []
        self.budget = ResolveBudget(MAX_RESOLVE_HOPS, MAX_RESOLVE_BYTES)

    def check(self) -> None:
        if self.deadline is not None:
            self.deadline.check()

    def skip(self, rel: PurePosixPath, why: str) -> None:
        log.warning("result entry skipped", path=str(rel), reason=why)
        self.report.skipped.append((str(rel), why))

    def copy_dir(self, src_fd: int, dst_fd: int, rel: PurePosixPath, depth: int) -> None:
        if depth > self.max_depth:
            raise UntrustedData(f"results: {rel} is nested deeper than {self.max_depth} levels")
        names = []
        with os.scandir(src_fd) as entries:
            for entry in entries:  # counted while read: a huge directory is refused early
                self.entries += 1
                self.name_bytes += len(os.fsencode(entry.name))
                if self.entries > self.max_entries:
                    raise UntrustedData(f"results: more than {self.max_entries} entries")
                if self.name_bytes > MAX_NAME_BYTES:
                    raise UntrustedData(f"results: names of more than {MAX_NAME_BYTES} bytes in all")
                names.append(entry.name)
        names.sort()
        for name in names:
            self.check()
            child = rel / name
            try:
                st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
            except FileNotFoundError:
                self.skip(child, "vanished while copying")
                continue
            if stat.S_ISDIR(st.st_mode):
                self._dir(src_fd, dst_fd, name, child, st, depth)
            elif stat.S_ISREG(st.st_mode):
                self._file(src_fd, dst_fd, name, child, st)
            elif stat.S_ISLNK(st.st_mode):
                self._symlink(src_fd, dst_fd, name, child)
            else:
                self.skip(child, f"not a regular file, directory or symlink (mode {st.st_mode:o})")

    def _dir(
        self, src_fd: int, dst_fd: int, name: str, rel: PurePosixPath, st: os.stat_result, depth: int
    ) -> None:
        with _opened(name, _DIR_FLAGS, src_fd, rel) as sub_fd:
            if sub_fd is None:
                self.skip(rel, "changed from a directory while copying")
                return
            if not _same(os.fstat(sub_fd), st):
                self.skip(rel, "replaced while copying")
                return
            os.mkdir(name, 0o700, dir_fd=dst_fd)
            with _opened(name, _DIR_FLAGS, dst_fd, rel) as new_fd:
                assert new_fd is not None  # we just created it inside our own stage
                self.report.directories += 1
                self.copy_dir(sub_fd, new_fd, rel, depth + 1)
                os.chmod(new_fd, stat.S_IMODE(st.st_mode) & 0o777 | 0o700)
                os.utime(new_fd, ns=(st.st_atime_ns, st.st_mtime_ns))

    def _file(self, src_fd: int, dst_fd: int, name: str, rel: PurePosixPath, st: os.stat_result) -> None:
        with _opened(name, _FILE_FLAGS, src_fd, rel) as in_fd:
            if in_fd is None:
                self.skip(rel, "changed from a regular file while copying")
                return
            opened = os.fstat(in_fd)
            if not stat.S_ISREG(opened.st_mode) or not _same(opened, st):
                self.skip(rel, "replaced while copying")
                return
            out_fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dst_fd)
            try:
                while True:
                    self.check()
                    budget = self.max_size - self.report.bytes
                    chunk = os.read(in_fd, min(CHUNK, budget + 1))
                    if not chunk:
                        break
                    if len(chunk) > budget:
                        raise UntrustedData(f"results are larger than the limit of {self.max_size} bytes")
                    _write_all(out_fd, chunk)
                    self.report.bytes += len(chunk)
                os.fchmod(out_fd, stat.S_IMODE(opened.st_mode) & 0o777)
                os.utime(out_fd, ns=(opened.st_atime_ns, opened.st_mtime_ns))
            finally:
                os.close(out_fd)
        self.report.files += 1

    def _symlink(self, src_fd: int, dst_fd: int, name: str, rel: PurePosixPath) -> None:
        try:
            target = os.readlink(name, dir_fd=src_fd)
        except OSError:
            self.skip(rel, "vanished or changed while copying")
            return
        if len(os.fsencode(target)) > MAX_LINK or "\0" in target:
            self.skip(rel, "symlink target too long")
            return
        problem = manifest.symlink_problem(os.fsencode(rel), os.fsencode(target))
        if problem:
            self.skip(rel, f"{LINK_REFUSED}: {problem}: {target!r}")
            return
        os.symlink(target, name, dir_fd=dst_fd)
        self.links.append(rel)
        self.report.symlinks += 1

    def drop_escaping_links(self, stage: Path) -> None:
        """Remove the copied symlinks that leave the tree once other symlinks are followed.

        The lexical test in `_symlink` cannot see chains (`a -> .`, `b -> a/..`), so every link is
        resolved again inside the finished stage, which only we can change.
        """
        escaping = [rel for rel in self.links if not resolves_inside(stage, rel, budget=self.budget)]
        for rel in escaping:
            os.unlink(stage / rel)
            self.report.symlinks -= 1
            self.skip(rel, LINK_ESCAPES)


LINK_REFUSED = "symlink refused by the link rule"
LINK_ESCAPES = "symlink leads outside the results through other symlinks"


def resolves_inside(
    top: Path, link: PurePosixPath, *, max_hops: int = 40, budget: ResolveBudget | None = None
) -> bool:
    """Resolve the symlink `top/link` component by component, never leaving `top`; False if it would.

    `top` must be a tree nobody else changes (our stage). Missing components are taken lexically.
    Every link followed is charged to `budget` (UntrustedData once it is spent). Each component
    costs one lookup relative to its directory's fd (never a path walk from `top`, which made a
    long target quadratic).
    """
    budget = budget if budget is not None else ResolveBudget()
    top_fd = os.open(top, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    # the folder reached so far: (name, O_PATH fd of it, or None once it is taken lexically)
    folder: list[tuple[str, int | None]] = []
    try:
        for part in link.parent.parts:
            if part != ".":
                folder.append((part, _open_dir(part, folder[-1][1] if folder else top_fd)))
        first = os.readlink(link.name, dir_fd=folder[-1][1] if folder else top_fd)
        budget.spend(first)
        pending = collections.deque(PurePosixPath(first).parts)
        hops = 0
        if pending and pending[0] == "/":
            return False
        while pending:
            part = pending.popleft()
            if part in ("", "."):
                continue
            if part == "..":
                if not folder:
                    return False
                _, fd = folder.pop()
                if fd is not None:
                    os.close(fd)
                continue
            here = folder[-1][1] if folder else top_fd
            try:
                st = os.lstat(part, dir_fd=here) if here is not None else None
            except OSError:
                st = None  # dangling from here on: lexical
            if st is not None and stat.S_ISLNK(st.st_mode):
                hops += 1
                target = os.readlink(part, dir_fd=here)
                budget.spend(target)
                if hops > max_hops or target.startswith("/"):
                    return False
                pending.extendleft(reversed(PurePosixPath(target).parts))
                continue
            is_dir = st is not None and stat.S_ISDIR(st.st_mode)
            folder.append((part, _open_dir(part, here) if is_dir else None))
        return True
    finally:
        for _, fd in folder:
            if fd is not None:
                os.close(fd)
        os.close(top_fd)


def _open_dir(name: str, dir_fd: int | None) -> int | None:
    """An O_PATH fd of the directory `name` in `dir_fd`, None if it is not one (or not there)."""
    if dir_fd is None:
        return None
    try:
        return os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


@contextlib.contextmanager
def _opened(name: str, flags: int, dir_fd: int, rel: PurePosixPath) -> Iterator[int | None]:
    """Open `name` under `dir_fd`; None when it turned out to be a symlink or another kind of file."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.ENOENT, errno.ENXIO, errno.EISDIR):
            yield None
            return
        raise
    try:
        yield fd
    finally:
        os.close(fd)


def open_beneath(top: Path, relative: PurePosixPath | str) -> int:
    """Open the folder `top/relative` without following a symlink in `relative` (top is trusted)."""
    fd = os.open(top, _DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        for part in PurePosixPath(relative).parts:
            if part in ("/", ".", ".."):
                raise UntrustedData(f"results path {relative} must be a plain relative path")
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise UntrustedData(
                    f"results folder {top / relative} is not a directory (or a symlink): {exc.strerror}"
                ) from exc
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def copy_results(
    src: Path,
    dest: Path,
    *,
    max_size: int,
    trusted: Path | None = None,
    max_entries: int = MAX_ENTRIES,
    max_depth: int = MAX_DEPTH,
    deadline: Deadline | None = None,
) -> CopyReport:
    """Copy the tree `src` into `dest` (which must not exist or be an empty folder).

    `trusted` is the part of `src` the host controls (default: `src.parent`); every component of
    `src` below it is opened without following symlinks, so a guest that replaced its results
    folder with a link to `/etc` gets an error, not a copy of `/etc`.
    """
    top = trusted if trusted is not None else src.parent
    try:
        relative = PurePosixPath(src.relative_to(top))
    except ValueError:
        raise UsageError(f"{src} is not inside {top}") from None
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise UsageError(f"--dest {dest}: must not exist or be an empty folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    copier = _Copier(max_size, max_entries, max_depth, deadline)
    try:
        src_fd = open_beneath(top, relative)
        try:
            stage_fd = os.open(stage, _DIR_FLAGS)
            try:
                copier.copy_dir(src_fd, stage_fd, PurePosixPath("."), 0)
                copier.drop_escaping_links(stage)
                src_mode = stat.S_IMODE(os.fstat(src_fd).st_mode)
                os.fchmod(stage_fd, src_mode & 0o777 | 0o700)
            finally:
                os.close(stage_fd)
        finally:
            os.close(src_fd)
        if dest.is_dir():
            dest.rmdir()  # empty, checked above
        os.rename(stage, dest)
    except UntrustedData:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise UntrustedData(f"copying results from {src} failed: {exc}") from exc
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    report = copier.report
    log.info(
        "results copied",
        src=str(src),
        dest=str(dest),
        files=report.files,
        directories=report.directories,
        symlinks=report.symlinks,
        bytes=report.bytes,
        skipped=len(report.skipped),
    )
    return report
