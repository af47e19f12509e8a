"""What every cloud backend does the same way, written once: the state folder, the per-build lock,
attach health, the builder's named states and the kill marker.

A cloud package (`cloudbuild/cloud/<name>/`, see docs/new-cloud.md) has the same modules for
every cloud: `api` (every SDK call, retries, error -> exit code), `identity` (this worker's id),
`volume` (its `Volume`), `devices` (where an attached volume appears here), `builder` (the
machine that runs the build and its boot hook), `console`, `gc` (a `common.GcAdapter`) and a thin
`backend`, a `CloudBackend` subclass. As nodepool's `statemachine.Adapter`, every hook below
has a documented default, so a new cloud overrides only what differs.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cloudbuild.backend import Backend, BuildSlot, was_killed
from cloudbuild.cloud.common import GcAdapter, Resource
from cloudbuild.deadline import Deadline
from cloudbuild.disk import buildstatus
from cloudbuild.errors import CloudbuildError, HostBroken, InfraError, UsageError
from cloudbuild.log import get_logger
from cloudbuild.options import VmOptions
from cloudbuild.volume import TAG_BUILD, Role, Volume, VolumePair, VolumeState

log = get_logger(__name__)

STATE_DIR_ENV = "CLOUDBUILD_STATE_DIR"
"""The one variable that moves every cloud's per-worker state (locks, attach health)."""

KILLED_STATUS = 1  # obs-build's kill: the build failed, nothing is extracted


def state_dir(cloud: str) -> Path:
    """Where a cloud keeps this worker's state: `$CLOUDBUILD_STATE_DIR/<cloud>`, by default
    `/var/lib/cloudbuild/<cloud>` as root, else under `$XDG_STATE_HOME`."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit) / cloud
    if os.geteuid() == 0:
        return Path("/var/lib/cloudbuild") / cloud
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cloudbuild" / cloud


@contextlib.contextmanager
def host_lock(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every cloudbuild process on this host (flock on `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class BuildLocks:
    """One lock file per running build on a worker (`<dir>/build-<id>.lock`), held by the build
    process with `flock`: the kernel releases it when the process exits or is killed, so a sweep on
    the same worker can tell a crashed build's resources from a running build's."""

    def __init__(self, directory: Path):
        self.directory = directory

    def _path(self, build_id: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in build_id)
        return self.directory / f"build-{safe}.lock"

    @contextlib.contextmanager
    def hold(self, build_id: str) -> Iterator[None]:
        fd = self.acquire(build_id)
        try:
            yield
        finally:
            self.release(build_id, fd)

    def acquire(self, build_id: str) -> int:
        """Take the build's lock (non-blocking: BlockingIOError when another process holds it)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path(build_id), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise
        return fd

    def release(self, build_id: str, fd: int) -> None:
        with contextlib.suppress(OSError):
            self._path(build_id).unlink()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def alive(self, build_id: str) -> bool:
        """True while some process on this host holds the build's lock."""
        try:
            fd = os.open(self._path(build_id), os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)


class WorkerGcAdapter(GcAdapter):
    """The part of a cloud's GC adapter that is the same everywhere: run on a worker, it tells a
    crashed build of that worker from a running one by the build's lock (`BuildLocks`)."""

    def __init__(self, cloud: str, *, local_worker: str | None, directory: Path | None):
        self.local_worker = local_worker  # this worker's instance/server id, when gc runs on a worker
        self.locks = BuildLocks((directory or state_dir(cloud)) / "builds")

    def build_alive(self, resource: Resource) -> bool | None:
        """On the owner itself, a build lives while its process holds its lock; elsewhere: unknown."""
        build = resource.tags.get(TAG_BUILD)
        if not build or self.local_worker is None or resource.owner != self.local_worker:
            return None
        return self.locks.alive(build)


class AttachHealth:
    """Counts volume attach/detach failures in a row on this worker, across builds (a small JSON
    file under the host lock). One failure is the cloud's problem (exit 3: retry elsewhere);
    `broken_after` in a row are this worker's (exit 4: take it out of service). A success clears
    the count. The file is advisory: a write that fails never fails a build."""

    def __init__(self, worker: str, directory: Path, *, broken_after: int = 2):
        self.worker = worker
        self.path = directory / "attach-failures.json"
        self.lock = directory / "attach-failures.lock"
        self.broken_after = broken_after

    def count(self) -> int:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return 0
        value = doc.get("failures") if isinstance(doc, dict) and doc.get("worker") == self.worker else 0
        return value if isinstance(value, int) and value >= 0 else 0

    def _write(self, failures: int) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False) as tmp:
                json.dump({"failures": failures, "worker": self.worker}, tmp)
            os.replace(tmp.name, self.path)
        except OSError as exc:
            log.warning("cannot record attach health", path=str(self.path), error=str(exc))

    def ok(self) -> None:
        with host_lock(self.lock):
            if self.count():
                self._write(0)

    def failed(self, error: CloudbuildError | str) -> CloudbuildError:
        """Record one failure; the error to raise (HostBroken once `broken_after` are in a row)."""
        with host_lock(self.lock):
            failures = self.count() + 1
            self._write(failures)
        if failures >= self.broken_after:
            return HostBroken(
                f"{error}; {failures} volume attach/detach failures in a row on worker {self.worker}: "
                f"take this worker out of service (state: {self.path})"
            )
        return error if isinstance(error, CloudbuildError) else InfraError(error)


class BuilderState(enum.StrEnum):
    """Where the builder machine of one build is; `CloudBackend.builder_state` holds it."""

    NONE = "none"  # no builder yet (or released)
    STARTING = "starting"  # launched or claimed, not yet running
    RUNNING = "running"  # the volumes are attached, the build runs
    STOPPED = "stopped"  # powered off (the guest's end or a kill): the volumes can come back
    LOST = "lost"  # vanished, terminated or in error under our feet: never reused


class RunningElsewhere(Volume):
    """The volumes of a build that another process on this worker runs (seen by `cloudbuild kill`,
    or by a second build started with the same id): never created, attached or released here."""

    def __init__(self, role: Role, build_id: str):
        super().__init__(role, 0, owned=False)
        self.build_id = build_id

    @property
    def id(self) -> str:
        return f"<{self.role.value} of build {self.build_id}, running elsewhere>"

    def create(self, *, deadline: Deadline | None = None) -> None:
        raise UsageError(f"build {self.build_id} is running on this worker already")

    def attach(self, host: str | None = None, *, deadline: Deadline | None = None) -> Path | None:
        return None

    def detach(self, *, deadline: Deadline | None = None) -> None:
        pass

    def delete(self) -> None:
        pass

    def release(self) -> None:
        pass

    def state(self) -> VolumeState:
        return VolumeState.ABSENT


def mark_swap_killed(swap: Volume) -> None:
    """A killed build failed, whatever the guest managed to write (obs-build: BUILDSTATUS1)."""
    device = swap.attach()
    if device is not None:
        buildstatus.write(device, KILLED_STATUS)


class CloudBackend(Backend):
    """The part of a cloud's Backend that is the same on every cloud.

    Lifecycle of one build: `volumes()` takes the build lock (`acquire_build_lock`) before anything
    is created, so `cloudbuild gc` on this worker can tell a running build from a crashed one;
    `cleanup()` releases the builder (`release_builder`) and then the lock. A build whose lock
    another process holds is `running_elsewhere` (that process is the build; we are
    `cloudbuild kill` or a duplicate build id).

    Hooks a cloud overrides (defaults in brackets):
    - `cloud` [class name]: the state folder's name and what logs call the cloud.
    - `worker_id` [required]: this worker's instance/server id (the owner tag of everything).
    - `release_builder()` [nothing]: terminate the builder, or hand it back to a warm pool.
    - `killed(slot)` [the kill marker exists]: whether the end of the builder was a kill.
    """

    cloud = "cloud"

    def __init__(self, options: VmOptions, *, state_dir: Path | None = None):
        super().__init__(options)
        self._state_dir = state_dir
        self.slot: BuildSlot | None = None
        self.pair: VolumePair | None = None
        self.builder_state = BuilderState.NONE
        self.running_elsewhere: str | None = None  # the build id another process on this worker runs
        self._build_lock: int | None = None

    @property
    def state_dir(self) -> Path:
        return self._state_dir or state_dir(self.cloud)

    @property
    def worker_id(self) -> str:
        raise NotImplementedError

    @property
    def build_locks(self) -> BuildLocks:
        return BuildLocks(self.state_dir / "builds")

    def acquire_build_lock(self, slot: BuildSlot) -> bool:
        """Hold the build's lock until cleanup; False when another process holds it."""
        self.slot = slot
        if self._build_lock is not None:
            return True
        try:
            self._build_lock = self.build_locks.acquire(slot.build_id)
        except BlockingIOError:
            self.running_elsewhere = slot.build_id
            return False
        return True

    def killed(self, slot: BuildSlot) -> bool:
        return was_killed(slot.workdir)

    def release_builder(self) -> None:
        """Terminate the builder (or hand it back to a pool); idempotent."""

    def cleanup(self) -> None:
        try:
            self.release_builder()
        finally:
            if self._build_lock is not None and self.slot is not None:
                self.build_locks.release(self.slot.build_id, self._build_lock)
                self._build_lock = None
