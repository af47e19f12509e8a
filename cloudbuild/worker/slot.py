"""One slot running one job: inputs fetched, a child `cloudbuild build` in its own session,
its live log uploaded in numbered chunks, the lease renewed while it runs.

A slot owns `WORKDIR/slots/N/` (recipe, result, the child's TMPDIR with its work folders and
disk images) so slots never share files and the start-up sweep knows what to clear.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cloudbuild.buildroot.hoststeps import log_path, statistics_path
from cloudbuild.errors import ExitCode, UntrustedData
from cloudbuild.log import get_logger
from cloudbuild.runner import spawn, terminate
from cloudbuild.worker.dirstore import digest_key
from cloudbuild.worker.job import Job, JobRejected
from cloudbuild.worker.protocols import Claim, Io, LeaseLost, Queue, Store

log = get_logger(__name__)

LOG_CHUNK_SECONDS = 2.0
LOG_CHUNK_MAX = 4 * 1024 * 1024


@dataclass
class SlotControl:
    """What the supervisor tells a running slot (from other threads)."""

    stop: threading.Event = field(default_factory=threading.Event)  # kill the build, release the job


@dataclass
class BuildResult:
    exit_code: int  # the child's exit code; negative: killed by that signal
    stopped: bool  # the supervisor stopped it (draining): the job goes back to the queue
    lease_lost: bool  # someone else may hold the job now: publish nothing
    out: Path  # results folder (OUT), with OUT.log and OUT.statistics beside it


class Slot:
    def __init__(
        self,
        number: int,
        folder: Path,
        *,
        queue: Queue,
        store: Store,
        io: Io,
        lease: float,
        on_renewal: Callable[[bool], None],
    ):
        self.number = number
        self.folder = folder
        self.queue = queue
        self.store = store
        self.io = io
        self.lease = lease
        self.on_renewal = on_renewal

    def prepare(self) -> None:
        """An empty slot folder (whatever an earlier job or run left is removed)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        (self.folder / "tmp").mkdir(parents=True)

    def fetch_recipe(self, job: Job) -> Path:
        """The recipe's folder unpacked into the slot; the path of its script."""
        if not self.io(lambda: self.store.has_input(job.recipe), "store: recipe lookup"):
            raise JobRejected(
                f"job field 'recipe': {job.recipe} does not exist in the store {self.store.url}"
            )
        tarball = self.folder / "recipe.tar"
        self.io(lambda: self.store.get_input(job.recipe, tarball), "store: recipe download")
        target = self.folder / "recipe"
        target.mkdir()
        try:
            with tarfile.open(tarball) as tar:
                tar.extractall(target, filter="data")  # no absolute paths, links out, devices
        except (tarfile.TarError, OSError) as exc:
            raise JobRejected(f"job field 'recipe': the recipe tarball is unusable: {exc}") from None
        script = target / job.script
        if not script.is_file() or script.is_symlink() or not os.access(script, os.X_OK):
            raise JobRejected(f"job field 'script': {job.script} is not an executable file in the recipe")
        return script

    def run_build(
        self, claim: Claim, argv: list[str], control: SlotControl, *, deadline: float | None
    ) -> BuildResult:
        """Run the child build to its end (or until stopped); upload its log and renew the lease meanwhile."""
        out = self.folder / "out"
        env = {**os.environ, "TMPDIR": str(self.folder / "tmp")}
        command = [sys.executable, "-m", "cloudbuild", "build", *argv, "--dest", str(out)]
        with open(self.folder / "child.log", "wb") as child_log:
            proc = spawn(command, stdout=child_log, stderr=subprocess.STDOUT, env=env, die_with_parent=True)
        (self.folder / "pid").write_text(str(proc.pid))
        uploader = _LogUploader(self, claim, log_path(out))
        renew_every = self.lease / 3
        renewed = time.monotonic()
        stopped = lease_lost = False
        code: int | None = None
        while code is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.wait(timeout=min(LOG_CHUNK_SECONDS, renew_every))
            uploader.upload()
            if code is not None:
                break
            if control.stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                stopped = control.stop.is_set()
                code = terminate(proc, grace=10.0)
                break
            if time.monotonic() - renewed >= renew_every:
                try:
                    self.io(lambda: self.queue.renew(claim, self.lease), "queue: lease renewal")
                    renewed = time.monotonic()
                    self.on_renewal(True)
                except LeaseLost:
                    self.on_renewal(False)
                    log.warning("lease lost: stopping the build, another worker may run it")
                    lease_lost = True
                    code = terminate(proc, grace=10.0)
        uploader.upload()
        (self.folder / "pid").unlink(missing_ok=True)
        return BuildResult(code, stopped, lease_lost, out)


class _LogUploader:
    """Ships what the build log grew by since the last call as the next numbered part."""

    def __init__(self, slot: Slot, claim: Claim, path: Path):
        self.slot = slot
        self.claim = claim
        self.path = path
        self.offset = 0
        self.part = 0

    def upload(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(LOG_CHUNK_MAX)
        except FileNotFoundError:
            return
        if not data:
            return
        part = self.part
        self.slot.io(
            lambda: self.slot.store.append_log(self.claim.message_id, self.claim.attempt, part, data),
            "store: log chunk",
        )
        self.offset += len(data)
        self.part += 1


def result_files(out: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """Store name -> local file for a finished build, and the manifest status.json carries.

    Results of `cloudbuild build` are already sanitised (regular files, folders, inside links);
    anything else found here is refused rather than stored."""
    files: dict[str, Path] = {}
    manifest: dict[str, str] = {}
    if out.is_dir():
        for path in sorted(out.rglob("*")):
            rel = "results/" + path.relative_to(out).as_posix()
            if path.is_symlink():
                files[rel] = path
                manifest[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                files[rel] = path
                manifest[rel] = digest_key(path)
            elif not path.is_dir():
                raise UntrustedData(f"result {rel} is neither a file, a folder nor a link")
    for name, path in (("build.log", log_path(out)), ("_statistics", statistics_path(out))):
        if path.is_file():
            files[name] = path
            manifest[name] = digest_key(path)
    return files, manifest


FINAL = (ExitCode.OK, ExitCode.BUILD_FAILED, ExitCode.UNCHANGED)
