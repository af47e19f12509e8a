"""The worker host's disk work around the build machine (the `HostSteps` of cloudbuild/build.py).

- prepare_root: mkfs + mount the root volume (or take the folder of a `directory` backend), copy
  the build root in, stage /.build (stage.py), `backend.fixup()`, `backend.kernel_files()`, unmount.
- reset_swap: zero the head of the swap volume (old status record, swap signature).
- read_status: the BUILDSTATUS record the guest left.
- extract: by the blocklist manifest on swap (never mounting the guest-written root), or from the
  folder as hostile input; staged, then moved into --dest: DEST gets the contents of
  $BUILD_RESULTS, DEST.statistics the `_statistics` file.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from cloudbuild.backend import Backend
from cloudbuild.buildroot import stage
from cloudbuild.deadline import Deadline
from cloudbuild.disk import buildstatus
from cloudbuild.disk.image import device_size, zero_head
from cloudbuild.disk.mkfs import make_filesystem, mount_options
from cloudbuild.disk.mount import mounted
from cloudbuild.errors import UntrustedData, UsageError
from cloudbuild.log import get_logger
from cloudbuild.options import VmOptions

log = get_logger(__name__)

SWAP_RESET_BYTES = 1024  # obs-build: dd bs=1024 count=1
MAX_STATISTICS = 64 * 1024


def statistics_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".statistics")


def log_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".log")


def check_dest(dest: Path) -> None:
    """--dest must not exist or be an empty folder (results are never mixed with older ones)."""
    if dest.is_symlink() or (dest.exists() and (not dest.is_dir() or any(dest.iterdir()))):
        raise UsageError(f"--dest {dest}: must not exist or be an empty folder")


class DiskHostSteps:
    def __init__(
        self,
        options: VmOptions,
        recipe: Path,
        *,
        build_id: str,
        workdir: Path,
        extra_variables: Mapping[str, str | Sequence[str]] | None = None,
    ):
        if options.rootfs is None:
            raise UsageError("--rootfs is required: a directory, tarball or image (see `cloudbuild rootfs`)")
        self.options = options
        self.recipe = recipe
        self.build_id = build_id
        self.workdir = workdir
        self.extra_variables = dict(extra_variables or {})

    # --- before the build ----------------------------------------------------------------------

    def prepare_root(self, device: Path, backend: Backend, deadline: Deadline) -> None:
        variables = stage.build_variables(
            self.options,
            self.recipe,
            build_id=self.build_id,
            guest_swap=backend.guest_swap_device,
            extra=self.extra_variables,
        )
        rootfs = Path(self.options.rootfs or "")
        if backend.channel == "directory":
            self._fill(device, rootfs, backend, variables, deadline)
            return
        fs = self.options.filesystem
        make_filesystem(device, fs, timeout=deadline.remaining(floor=1.0))
        with mounted(
            device, self.workdir / "mnt", fstype=fs, options=mount_options(fs, self.options.mount_options)
        ) as root:
            self._fill(root, rootfs, backend, variables, deadline)

    def _fill(
        self,
        root: Path,
        rootfs: Path,
        backend: Backend,
        variables: Mapping[str, str | Sequence[str]],
        deadline: Deadline,
    ) -> None:
        stage.copy_rootfs(rootfs, root, workdir=self.workdir, timeout=deadline.remaining(floor=1.0))
        stage.stage_build_root(root, self.recipe, variables)
        backend.fixup(root)
        backend.kernel_files(root)

    def reset_swap(self, device: Path, deadline: Deadline) -> None:
        zero_head(device, SWAP_RESET_BYTES)

    # --- after the build -----------------------------------------------------------------------

    def read_status(self, device: Path) -> int | None:
        return buildstatus.read(device)

    def extract(self, root: Path, swap: Path | None, dest: Path, deadline: Deadline) -> None:
        check_dest(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if swap is None:
            self._extract_folder(root, dest, deadline)
            return
        from cloudbuild.disk.extract import extract_results

        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.stage-", dir=dest.parent))
        try:
            # links are checked against the folder that becomes DEST (`results/up -> ..` would
            # point at DEST's parent), as the directory channel does
            extract_results(
                root,
                swap,
                skip=512,
                dest=staging,
                max_size=device_size(root),
                deadline=deadline,
                dest_subtree=os.fsencode(stage.RESULTS),
            )
            self._move_results(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def extract_statistics(self, root: Path, swap: Path | None, dest: Path, deadline: Deadline) -> None:
        """A failed build: only DEST.statistics (the manifest of a failed build lists nothing else)."""
        if swap is None:
            self._copy_folder_statistics(root, dest)
            return
        from cloudbuild.disk.extract import extract_results

        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.stage-", dir=dest.parent))
        try:
            extract_results(root, swap, skip=512, dest=staging, max_size=MAX_STATISTICS)
            extra = sorted(p.name for p in staging.iterdir() if p.name != stage.STATISTICS)
            if extra:
                raise UntrustedData(f"the failed build's manifest lists more than _statistics: {extra[:5]}")
            self._keep_statistics(staging / stage.STATISTICS, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _keep_statistics(statistics: Path, dest: Path) -> None:
        if (
            statistics.is_file()
            and not statistics.is_symlink()
            and statistics.stat().st_size <= MAX_STATISTICS
        ):
            shutil.move(statistics, statistics_path(dest))

    def _move_results(self, staging: Path, dest: Path) -> None:
        results = staging / stage.RESULTS
        if results.is_symlink() or not results.is_dir():
            raise UntrustedData("the build machine's manifest has no results folder")
        extra = sorted(p.name for p in staging.iterdir() if p.name not in (stage.RESULTS, stage.STATISTICS))
        if extra:
            raise UntrustedData(f"the build machine's manifest lists unexpected entries: {extra[:5]}")
        self._keep_statistics(staging / stage.STATISTICS, dest)
        if dest.is_dir():
            dest.rmdir()  # empty: checked by check_dest
        os.rename(results, dest)

    def _extract_folder(self, root: Path, dest: Path, deadline: Deadline) -> None:
        from cloudbuild.disk.dircopy import copy_results

        # `_statistics` first: nothing can fail after the results are in DEST
        statistics = read_statistics(root)
        copy_results(
            root / stage.OUT_DIR / stage.RESULTS, dest, max_size=self._folder_limit(), trusted=root, deadline=deadline
        )
        if statistics is not None:
            try:
                statistics_path(dest).write_bytes(statistics)
            except OSError:
                shutil.rmtree(dest, ignore_errors=True)
                raise

    @staticmethod
    def _copy_folder_statistics(root: Path, dest: Path) -> None:
        """A failed directory-channel build: its `_statistics` alone (read_statistics's rules)."""
        statistics = read_statistics(root)
        if statistics is not None:
            statistics_path(dest).write_bytes(statistics)

    def _folder_limit(self) -> int:
        return self.options.disk_size * 1024 * 1024


def read_statistics(root: Path) -> bytes | None:
    """The guest's `/.build.out/_statistics` of a directory-channel build: a regular file (fstat
    after an O_NOFOLLOW|O_NONBLOCK open: never a device, FIFO or symlink) of at most
    MAX_STATISTICS bytes; None when there is no such file."""
    from cloudbuild.disk.dircopy import open_beneath

    # the folder is the guest's: no path through it is followed (a link could point anywhere)
    try:
        out_fd = open_beneath(root, stage.OUT_DIR)
    except (OSError, UntrustedData):
        return None
    try:
        fd = os.open(stage.STATISTICS, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=out_fd)
    except OSError:
        return None
    finally:
        os.close(out_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_STATISTICS:
            log.warning("guest _statistics ignored: not a regular file or too large", mode=oct(st.st_mode))
            return None
        data = os.read(fd, MAX_STATISTICS + 1)
        return data if len(data) <= MAX_STATISTICS else None
    finally:
        os.close(fd)
