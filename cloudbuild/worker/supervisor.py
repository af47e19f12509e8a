"""The worker's main loop: claim jobs into free slots, run each as a child build, turn its exit
code into a queue action, drain on SIGTERM/SIGINT. It only knows the Queue and Store protocols.

Exit code -> queue action (obs-build's codes):
- 0, 1, 2: final. Results (or the failure's log) are published, then the job is acknowledged.
- 3 (and a crashed or killed child): released at once for another worker; after
  `max_attempts` deliveries the job is dead-lettered with a failed-permanently result.
- 4: released, and this host takes no more jobs: the worker reports unhealthy and exits 4.
A job the worker refuses (schema, options, missing recipe) gets a failed-permanently result at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from cloudbuild import options as cboptions
from cloudbuild.deadline import Deadline
from cloudbuild.errors import ExitCode
from cloudbuild.log import bound, get_logger
from cloudbuild.retry import Policy, call_with_retries
from cloudbuild.runner import run, which
from cloudbuild.worker import job as jobs
from cloudbuild.worker.observe import Health, Metrics
from cloudbuild.worker.protocols import Claim, LeaseLost, Queue, Store, Unreachable
from cloudbuild.worker.slot import FINAL, BuildResult, Slot, SlotControl, result_files

log = get_logger(__name__)
T = TypeVar("T")

IO_POLICY = Policy(deadline=900.0, initial=0.5, maximum=15.0, attempts=1000)
"""An unreachable queue or store is waited out this long (the job in hand is kept meanwhile)."""

POLL_SECONDS = 1.0  # how often an idle worker looks at the queue
HARD_DEADLINE_GRACE = 300.0  # past a job's own timeout, the worker kills a build that ignored it


@dataclass(frozen=True)
class WorkerConfig:
    owner: str
    workdir: Path
    build_argv: tuple[str, ...]  # the operator's `cloudbuild build` options
    base: cboptions.VmOptions  # the same, parsed
    allowance: jobs.Allowance = field(default_factory=jobs.Allowance)
    slots: int = 1
    max_jobs: int | None = None
    idle_exit: float | None = None
    drain_timeout: float = 600.0
    lease: float = 300.0
    max_attempts: int = 3


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Supervisor:
    def __init__(self, config: WorkerConfig, queue: Queue, store: Store, *, metrics: Metrics | None = None):
        self.config = config
        self.queue = queue
        self.store = store
        self.metrics = metrics or Metrics()
        self.health = Health()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._busy: dict[int, tuple[threading.Thread, SlotControl]] = {}
        self.draining = False
        self._signals = 0
        self.claimed = 0

    # -- queue/store calls, retried while unreachable -----------------------------------------
    def io(self, fn: Callable[[], T], what: str) -> T:
        def attempt() -> T:
            try:
                value = fn()
            except Unreachable:
                self.health.reached(False)
                raise
            self.health.reached(True)
            return value

        return call_with_retries(
            attempt, is_transient=lambda e: isinstance(e, Unreachable), what=what, policy=IO_POLICY
        )

    # -- signals ------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        self.draining = True
        # locks are taken from a thread: the handler runs in the main thread, which may hold them
        stop_now = self._signals > 1  # the second one: stop the builds now (their jobs are still released)
        threading.Thread(target=self._after_signal, args=(stop_now,), name="on-signal", daemon=True).start()

    def _after_signal(self, stop_now: bool) -> None:
        if stop_now:
            self._stop_all()
        self._wake.set()

    @contextlib.contextmanager
    def _handling_signals(self) -> Iterator[None]:
        sigs = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in sigs}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _stop_all(self) -> None:
        with self._lock:
            for _, control in self._busy.values():
                control.stop.set()

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> int:
        with self._handling_signals():
            self.sweep()
            idle_since = time.monotonic()
            while not self.draining and self.health.broken is None:
                if self.config.max_jobs is not None and self.claimed >= self.config.max_jobs:
                    break
                free = self._free_slot()
                claim = None
                if free is not None:
                    claim = self.io(
                        lambda: self.queue.claim(self.config.owner, self.config.lease), "queue: claim"
                    )
                if claim is not None and free is not None:
                    self.claimed += 1
                    self._start(free, claim)
                    continue
                if self._busy_count():
                    idle_since = time.monotonic()
                elif (
                    self.config.idle_exit is not None
                    and time.monotonic() - idle_since >= self.config.idle_exit
                ):
                    log.info("idle: exiting", idle_seconds=self.config.idle_exit)
                    break
                self._wake.wait(POLL_SECONDS)
                self._wake.clear()
            self._drain()
        if self.health.broken is not None:
            log.error("host broken: exiting 4", reason=self.health.broken)
            return int(ExitCode.HOST_BROKEN)
        return 0

    def _free_slot(self) -> int | None:
        with self._lock:
            for number in range(self.config.slots):
                if number not in self._busy:
                    return number
        return None

    def _busy_count(self) -> int:
        with self._lock:
            return len(self._busy)

    def _start(self, number: int, claim: Claim) -> None:
        control = SlotControl()
        thread = threading.Thread(
            target=self._slot_main, args=(number, claim, control), name=f"slot-{number}"
        )
        with self._lock:
            self._busy[number] = (thread, control)
            self.metrics.busy_slots.set(len(self._busy))
        thread.start()

    def _drain(self) -> None:
        """Let running builds finish within --drain-timeout, then stop them (their jobs are released)."""
        deadline = Deadline("drain", self.config.drain_timeout)
        with self._lock:
            threads = [t for t, _ in self._busy.values()]
        if threads:
            log.info("draining", running=len(threads), drain_timeout=self.config.drain_timeout)
        for thread in threads:
            thread.join(deadline.remaining())
        if any(t.is_alive() for t in threads):
            log.warning("drain timeout: stopping the builds still running, releasing their jobs")
            self._stop_all()
            for thread in threads:
                thread.join()

    # -- one job ------------------------------------------------------------------------------
    def _slot_main(self, number: int, claim: Claim, control: SlotControl) -> None:
        with bound(job=claim.message_id, attempt=claim.attempt, slot=number, worker=self.config.owner):
            try:
                self._run_job(number, claim, control)
            except LeaseLost as exc:
                log.warning("job lost to another worker", error=str(exc))
            except Exception as exc:  # a bug or a dead store: give the job back, keep the worker up
                log.exception("job failed in the worker: releasing it", error=str(exc))
                with contextlib.suppress(Exception):
                    self.io(lambda: self.queue.release(claim), "queue: release")
            finally:
                with self._lock:
                    self._busy.pop(number, None)
                    self.metrics.busy_slots.set(len(self._busy))
                self._wake.set()

    def _slot(self, number: int) -> Slot:
        return Slot(
            number,
            self.config.workdir / "slots" / str(number),
            queue=self.queue,
            store=self.store,
            io=self.io,
            lease=self.config.lease,
            on_renewal=lambda ok: self.metrics.lease_renewals.labels("ok" if ok else "failed").inc(),
        )

    def _run_job(self, number: int, claim: Claim, control: SlotControl) -> None:
        job_id = claim.message_id
        log.info("job claimed")
        self._observe_wait(job_id)
        if claim.attempt > self.config.max_attempts:
            self._give_up(
                claim, f"gave up after {claim.attempt - 1} attempts (lease expired or infrastructure failed)"
            )
            return
        slot = self._slot(number)
        started = time.monotonic()
        try:
            job = jobs.parse(claim.body)
            if job.id != job_id:
                raise jobs.JobRejected(
                    f"job field 'id': {job.id!r} differs from its queue message id {job_id!r}"
                )
            argv = self.config.allowance.argv(job, self.config.base)
            slot.prepare()
            script = slot.fetch_recipe(job)
            argv += ["--rootfs", str(self._rootfs(job))] if job.rootfs else []
        except jobs.JobRejected as exc:
            log.warning("job rejected", reason=str(exc))
            self._final(claim, {"state": "failed-permanently", "reason": str(exc)}, {}, "rejected")
            return
        self.metrics.phase_seconds.labels("fetch").observe(time.monotonic() - started)
        self.io(
            lambda: self.store.set_state(
                job_id,
                {
                    "state": "running",
                    "attempt": claim.attempt,
                    "worker": self.config.owner,
                    "slot": number,
                    "since": now_iso(),
                },
            ),
            "store: state",
        )
        timeout = job.timeout or self.config.base.build_timeout
        deadline = time.monotonic() + timeout + HARD_DEADLINE_GRACE if timeout else None
        build_argv = [
            *self.config.build_argv, *argv, "--build-id", f"{job_id}-{claim.attempt}",
            "--vm-worker-nr", str(number), "--log-format", "json", str(script),
        ]  # fmt: skip
        log.info("build starting")
        started = time.monotonic()
        result = slot.run_build(claim, build_argv, control, deadline=deadline)
        self.metrics.phase_seconds.labels("build").observe(time.monotonic() - started)
        log.info("build ended", exit_code=result.exit_code, stopped=result.stopped)
        self._settle(claim, result)

    def _settle(self, claim: Claim, result: BuildResult) -> None:
        """The build's end -> a result and a queue action."""
        code = result.exit_code
        if result.lease_lost:
            return
        if result.stopped:
            self._release(claim, "stopped while draining")
        elif code in FINAL:
            files, manifest = result_files(result.out)
            status = {"state": "done", "exit_code": code, "files": manifest}
            self._final(claim, status, files, {0: "ok", 1: "failed", 2: "unchanged"}[code])
        elif code == ExitCode.HOST_BROKEN:
            self.health.host_broken(f"build of {claim.message_id} exited 4")
            self._release(claim, "this host is broken (exit 4)")
        elif claim.attempt >= self.config.max_attempts:
            files, manifest = result_files(result.out)
            reason = f"infrastructure failed {claim.attempt} times (last exit {code}): moved to dead-letter"
            self._give_up(claim, reason, files=files, manifest=manifest)
        else:
            self._release(claim, f"infrastructure problem (exit {code}): retrying elsewhere")

    def _release(self, claim: Claim, reason: str) -> None:
        log.info("job released", reason=reason)
        self.metrics.jobs.labels("released").inc()
        self.io(
            lambda: self.store.set_state(
                claim.message_id,
                {"state": "queued", "attempt": claim.attempt, "reason": reason, "since": now_iso()},
            ),
            "store: state",
        )
        self.io(lambda: self.queue.release(claim), "queue: release")

    def _give_up(
        self,
        claim: Claim,
        reason: str,
        *,
        files: Mapping[str, Path] | None = None,
        manifest: Mapping[str, str] | None = None,
    ) -> None:
        status = {"state": "failed-permanently", "reason": reason, "files": dict(manifest or {})}
        self._final(claim, status, files or {}, "dead-letter", dead=True)

    def _final(
        self,
        claim: Claim,
        status: Mapping[str, Any],
        files: Mapping[str, Path],
        outcome: str,
        *,
        dead: bool = False,
    ) -> None:
        """Publish the result, then (only then) take the job off the queue."""
        started = time.monotonic()
        record = {**status, "worker": self.config.owner, "finished": now_iso()}
        published = self.io(
            lambda: self.store.publish(claim.message_id, claim.attempt, files, record), "store: publish"
        )
        self.metrics.phase_seconds.labels("publish").observe(time.monotonic() - started)
        if not published:
            log.warning("another delivery of this job published first; keeping its result")
        if dead:
            self.io(lambda: self.queue.dead_letter(claim), "queue: dead-letter")
        else:
            self.io(lambda: self.queue.ack(claim), "queue: ack")
        self.metrics.jobs.labels(outcome).inc()
        log.info("job finished", outcome=outcome, published=published)

    def _observe_wait(self, job_id: str) -> None:
        with contextlib.suppress(Exception):
            state = self.store.state(job_id) or {}
            queued = state.get("queued_at")
            if isinstance(queued, int | float):
                self.metrics.queue_wait.observe(max(0.0, time.time() - queued))

    def _rootfs(self, job: jobs.Job) -> Path:
        """The job's build root from this worker's cache (by content digest), downloaded once."""
        assert job.rootfs
        cache = self.config.workdir / "rootfs-cache"
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / job.rootfs
        with self._lock:  # two slots wanting the same new build root download it once
            if not target.exists():
                if not self.io(lambda: self.store.has_input(job.rootfs or ""), "store: rootfs lookup"):
                    raise jobs.JobRejected(
                        f"job field 'rootfs': {job.rootfs} does not exist in the store {self.store.url}"
                    )
                self.io(lambda: self.store.get_input(job.rootfs or "", target), "store: rootfs download")
        return target

    # -- start-up sweep -----------------------------------------------------------------------
    def sweep(self) -> None:
        """Clear what an earlier run of this worker left: claims, slot folders, builds, mounts, loop devices."""
        released = self.io(lambda: self.queue.sweep(self.config.owner), "queue: sweep")
        slots = self.config.workdir / "slots"
        killed = _kill_recorded_builds(slots)
        mounts = _unmount_under(slots)
        loops = _detach_loops_under(slots)
        if slots.exists():
            shutil.rmtree(slots, ignore_errors=True)
        slots.mkdir(parents=True, exist_ok=True)
        log.info("start-up sweep", released=released, killed=killed, unmounted=mounts, loop_devices=loops)


def _kill_recorded_builds(slots: Path) -> list[int]:
    """Builds an earlier run started (their pid files), still alive: killed with their session."""
    killed = []
    for pid_file in slots.glob("*/pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(pid_file.parent).encode() in cmdline:  # the same process, not a reused pid
                os.killpg(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def _unmount_under(folder: Path) -> list[str]:
    prefix = str(folder.resolve()) + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [line.split()[4] for line in f]
    mine = sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)
    for point in mine:
        run(["umount", "-l", point], check=False, timeout=60)
    return mine


def _detach_loops_under(folder: Path) -> list[str]:
    if which("losetup") is None:
        return []
    listing = run(
        ["losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE"], check=False, timeout=60
    )
    prefix = str(folder.resolve()) + "/"
    detached = []
    for line in (listing.stdout or "").splitlines():
        name, _, back = line.strip().partition(" ")
        if back.strip().startswith(prefix):
            run(["losetup", "-d", name], check=False, timeout=60)
            detached.append(name)
    return detached
