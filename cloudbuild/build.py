"""The orchestrator: one build, the same phases for every backend, cleanup always.

    verify -> volumes -> prepare (attach here, mkfs, stage, detach) -> boot (backend)
           -> status (attach swap here, BUILDSTATUS) -> extract -> cleanup (detach, delete)

Each phase runs under a `Deadline` that it passes down to its waits and commands, and is logged
as one structured `phase` event with its duration and outcome. Whatever happens, `cleanup` runs:
every volume created for the build is detached and (if we own it) deleted, and the backend
releases its machine. The host-side disk work (mkfs, staging, status, extraction) is behind the
`HostSteps` protocol so the policy here is tested without disks and the disk work without VMs.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from cloudbuild.backend import Backend, BootResult, BuildSlot, Console, ExitReason, clear_killed
from cloudbuild.deadline import Deadline
from cloudbuild.errors import (
    BuildFailed,
    CloudbuildError,
    DeadlineExceeded,
    ExitCode,
    InfraError,
    Unchanged,
    exit_code_for,
)
from cloudbuild.log import bound, get_logger
from cloudbuild.volume import Volume, VolumePair

log = get_logger(__name__)


@dataclass(frozen=True)
class PhaseLimits:
    """Seconds each phase may take (boot: the build timeout, None = unlimited)."""

    verify: float = 60.0
    volumes: float = 600.0
    prepare: float = 1800.0
    boot: float | None = None
    status: float = 600.0
    extract: float = 3600.0
    cleanup: float = 600.0


@dataclass(frozen=True)
class BuildJob:
    build_id: str
    dest: Path  # results land here (staged beside it, moved in on success)
    workdir: Path  # private scratch folder of this build (logs, kernel copies, ...)
    slot: int = 0
    limits: PhaseLimits = field(default_factory=PhaseLimits)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex[:12]


class HostSteps(Protocol):
    """The disk work the worker host does around the build machine."""

    def prepare_root(self, device: Path, backend: Backend, deadline: Deadline) -> None:
        """Make the filesystem on the root (or use the folder), stage the build root, run fixups."""

    def reset_swap(self, device: Path, deadline: Deadline) -> None:
        """Clear any old status record from the swap volume."""

    def read_status(self, device: Path) -> int | None:
        """The BUILDSTATUS the guest left on swap, None when there is none."""

    def extract(self, root: Path, swap: Path | None, dest: Path, deadline: Deadline) -> None:
        """Copy the results out of the root (by the swap manifest, or from the folder) into dest."""

    def extract_statistics(self, root: Path, swap: Path | None, dest: Path, deadline: Deadline) -> None:
        """A failed build: only its `_statistics`, beside dest (never a partial result)."""


@dataclass
class BuildOutcome:
    exit_code: ExitCode
    message: str = ""
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase


class Orchestrator:
    def __init__(self, job: BuildJob, backend: Backend, steps: HostSteps, console: Console):
        self.job = job
        self.backend = backend
        self.steps = steps
        self.console = console
        self.slot = BuildSlot(job.build_id, job.slot, job.workdir)
        self.phases: dict[str, float] = {}
        self.pair: VolumePair | None = None
        self._created: list[Volume] = []
        self._running = False  # boot_and_wait started and did not return: the machine may still run

    @contextlib.contextmanager
    def phase(self, name: str, seconds: float | None) -> Iterator[Deadline]:
        deadline = Deadline(name, seconds)
        outcome = "ok"
        with bound(phase=name):
            try:
                yield deadline
                deadline.check()
            except BaseException as exc:
                outcome = type(exc).__name__
                raise
            finally:
                self.phases[name] = round(deadline.elapsed(), 3)
                log.info("phase", phase=name, seconds=self.phases[name], outcome=outcome)

    def run(self) -> BuildOutcome:
        """Run the build; never raises for build or infrastructure failures, returns the exit code."""
        started = time.monotonic()
        with bound(build=self.job.build_id, vm_type=self.backend.name):
            try:
                self._run_phases()
                outcome = BuildOutcome(ExitCode.OK)
            except CloudbuildError as exc:
                outcome = BuildOutcome(exc.exit_code, str(exc))
            except Exception as exc:  # a bug: still clean up, and report it as an infrastructure failure
                log.exception("unexpected error")
                outcome = BuildOutcome(exit_code_for(exc), f"internal error: {exc!r}")
            finally:
                cleanup_error = self._cleanup()
            if cleanup_error and outcome.exit_code == ExitCode.OK:
                outcome = BuildOutcome(ExitCode.INFRA, f"cleanup failed: {cleanup_error}")
            outcome.phases = dict(self.phases)
            log.info(
                "build finished",
                exit_code=int(outcome.exit_code),
                message=outcome.message,
                seconds=round(time.monotonic() - started, 3),
            )
            return outcome

    def _run_phases(self) -> None:
        limits = self.job.limits
        with self.phase("verify", limits.verify):
            self.backend.verify()
        with self.phase("volumes", limits.volumes) as deadline:
            self.pair = self.backend.volumes(self.slot)
            for volume in self.pair:
                # recorded before create(): a create that fails half way (the volume exists but
                # never became available) must still be released; release() of a volume that
                # does not exist is a no-op
                self._created.append(volume)
                with bound(volume=volume.id, role=volume.role.value):
                    volume.create(deadline=deadline)
        pair = self.pair
        swap_channel = self.backend.channel == "swap"
        with self.phase("prepare", limits.prepare) as deadline:
            root_dev = self._attach(pair.root, deadline, first_use=True)
            self.steps.prepare_root(root_dev, self.backend, deadline)
            if swap_channel:
                pair.root.detach(deadline=deadline)
                if pair.swap is not None:
                    self.steps.reset_swap(self._attach(pair.swap, deadline, first_use=True), deadline)
                    pair.swap.detach(deadline=deadline)
        with self.phase("boot", limits.boot) as deadline:
            # an earlier build's `cloudbuild kill` in a kept --root must not make this one "killed";
            # here, once, for every backend (each reads the marker when its machine ends)
            clear_killed(self.slot.workdir)
            self._running = True
            result = self.backend.boot_and_wait(
                pair, self.slot, timeout=deadline.seconds, console=self.console
            )
            self._running = False
        status = self._status(result, pair, limits.status)
        if status == 1:
            self._failed_statistics(pair, swap_channel, limits.extract)
            raise BuildFailed("the build failed (BUILDSTATUS1)")
        if status not in (0, 2):
            raise InfraError(f"the build machine reported status {status}")
        with self.phase("extract", limits.extract) as deadline:
            if swap_channel:
                swap_dev = self._attach(pair.swap, deadline) if pair.swap is not None else None
                self.steps.extract(self._attach(pair.root, deadline), swap_dev, self.job.dest, deadline)
            else:
                self.steps.extract(self._attach(pair.root, deadline), None, self.job.dest, deadline)
        if status == 2:
            raise Unchanged("the build result is unchanged")

    def _failed_statistics(self, pair: VolumePair, swap_channel: bool, seconds: float) -> None:
        """A failed build still hands back its `_statistics` (obs-build does); missing it is no error."""
        try:
            with self.phase("statistics", seconds) as deadline:
                swap = self._attach(pair.swap, deadline) if swap_channel and pair.swap is not None else None
                self.steps.extract_statistics(
                    self._attach(pair.root, deadline), swap, self.job.dest, deadline
                )
        except CloudbuildError as exc:
            log.warning("no statistics of the failed build", error=str(exc))

    def _attach(self, volume: Volume, deadline: Deadline, *, first_use: bool = False) -> Path:
        """Attach here; on first use, a supplied volume (not ours) is wiped of what an earlier
        user left on it, here and only here, for every backend."""
        with bound(volume=volume.id, role=volume.role.value):
            device = volume.attach(deadline=deadline)
            if device is None:
                raise InfraError(f"{volume!r}: attach to this worker returned no device")
            if first_use and not volume.owned:
                volume.wipe(device)
        return device

    def _status(self, result: BootResult, pair: VolumePair, seconds: float) -> int:
        with self.phase("status", seconds) as deadline:
            if result.reason in (ExitReason.TIMEOUT, ExitReason.WATCHDOG, ExitReason.CRASHED):
                raise InfraError(
                    f"build machine {result.reason.value}" + (f": {result.detail}" if result.detail else "")
                )
            if self.backend.channel == "directory":
                if result.status is None:
                    raise InfraError("the build machine exited without a status")
                # a container killed from outside or dying on its own exits 255: infrastructure
                return 3 if result.status == 255 else result.status
            if pair.swap is None:
                raise InfraError("no swap volume to read the build status from")
            status = self.steps.read_status(self._attach(pair.swap, deadline))
            if status is None:
                raise InfraError(
                    "no build status on the swap volume: the base system or the build host is broken"
                )
            self.backend.build_finished(status)
            return status

    def _cleanup(self) -> str | None:
        """Detach and delete everything created for this build; return the first failure, if any."""
        first_error: str | None = None
        try:
            with self.phase("cleanup", self.job.limits.cleanup):
                if self._running:
                    # boot_and_wait failed: a machine that may still run holds the volumes, stop it first
                    try:
                        self.backend.kill()
                    except Exception as exc:
                        log.error("backend kill failed", error=str(exc))
                        first_error = f"backend kill: {exc}"
                for volume in reversed(self._created):
                    with bound(volume=volume.id, role=volume.role.value):
                        try:
                            volume.release()
                        except Exception as exc:
                            log.error("volume release failed", error=str(exc))
                            first_error = first_error or f"{volume!r}: {exc}"
                try:
                    self.backend.cleanup()
                except Exception as exc:
                    log.error("backend cleanup failed", error=str(exc))
                    first_error = first_error or f"backend cleanup: {exc}"
        except DeadlineExceeded as exc:  # every step ran; it just took too long: report, never raise
            first_error = first_error or str(exc)
        return first_error


def run_build(job: BuildJob, backend: Backend, steps: HostSteps, console: Console) -> BuildOutcome:
    return Orchestrator(job, backend, steps, console).run()
