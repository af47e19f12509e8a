"""The orchestrator: phases in order, exit codes from statuses, and cleanup after any failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from cloudbuild.backend import BootResult, ExitReason
from cloudbuild.build import BuildJob, BuildOutcome, Orchestrator, PhaseLimits, run_build
from cloudbuild.errors import DeadlineExceeded, ExitCode, HostBroken, InfraError, UsageError
from cloudbuild.runner import CommandError
from cloudbuild.volume import Role, VolumeState
from tests.fakes.console import RecordingConsole
from tests.fakes.memory import Faults, Ledger, MemoryBackend, MemorySteps

PHASES = ["verify", "volumes", "prepare", "boot", "status", "extract", "cleanup"]


class World:
    """One build against the fakes; `violations` must stay empty in every test."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        faults: dict[str, BaseException] | None = None,
        status: int | None = 0,
        result: BootResult | None = None,
        **backend_options: object,
    ):
        self.ledger = Ledger()
        self.faults = Faults(faults)
        self.backend = MemoryBackend(ledger=self.ledger, faults=self.faults, result=result, **backend_options)  # type: ignore[arg-type]
        self.steps = MemorySteps(self.ledger, self.faults, status=status)
        self.console = RecordingConsole()
        self.job = BuildJob(build_id="b1", dest=tmp_path / "dest", workdir=tmp_path / "work", slot=2)

    def run(self) -> BuildOutcome:
        return run_build(self.job, self.backend, self.steps, self.console)

    @property
    def events(self) -> list[str]:
        return self.ledger.events

    def assert_nothing_left(self) -> None:
        assert self.ledger.violations == []
        for volume in self.ledger.volumes.values():
            assert volume.host is None, f"{volume.id} still attached to {volume.host}"
            if volume.owned:
                assert volume.state() == VolumeState.ABSENT, f"{volume.id} was not deleted"
            else:
                assert not volume.deleted, f"{volume.id} is the user's and was deleted"
        assert self.backend.cleanup_calls == 1


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    assert w.ledger.violations == []


# --- the good path ----------------------------------------------------------------------------


def test_a_successful_build_runs_every_phase_in_order_and_leaves_nothing(world: World) -> None:
    outcome = world.run()
    assert (outcome.exit_code, outcome.message) == (ExitCode.OK, "")
    assert world.events == [
        "verify",
        "volumes",
        "create:root",
        "create:swap",
        "attach@worker:root",
        "prepare_root",
        "detach:root",
        "attach@worker:swap",
        "reset_swap",
        "detach:swap",
        "boot",
        "attach@builder:root",
        "attach@builder:swap",
        "detach:root",
        "detach:swap",
        "attach@worker:swap",
        "read_status",
        "attach@worker:swap",
        "attach@worker:root",
        "extract",
        "detach:swap",
        "delete:swap",
        "detach:root",
        "delete:root",
        "backend.cleanup",
    ]
    assert world.steps.extracted_to == world.job.dest
    assert bytes(world.console.data) == world.backend.console_bytes
    assert list(outcome.phases) == PHASES
    world.assert_nothing_left()


def test_without_swap_the_build_cannot_report_a_status(tmp_path: Path) -> None:
    world = World(tmp_path, swap=False)
    outcome = world.run()
    assert outcome.exit_code == ExitCode.INFRA
    assert "no swap volume" in outcome.message
    world.assert_nothing_left()


# --- a failure in every phase still cleans up -------------------------------------------------

FAILURES = {
    "verify": ("verify", UsageError("--vm-type kvm: /dev/kvm missing"), ExitCode.BUILD_FAILED),
    "verify-host": ("verify", HostBroken("hypervisor unusable"), ExitCode.HOST_BROKEN),
    "volumes": ("volumes", InfraError("quota"), ExitCode.INFRA),
    "create root": ("create:root", InfraError("CreateVolume throttled"), ExitCode.INFRA),
    "create swap": ("create:swap", InfraError("CreateVolume throttled"), ExitCode.INFRA),
    "attach root": ("attach:root@worker", DeadlineExceeded("attach timed out"), ExitCode.INFRA),
    "prepare": ("prepare_root", CommandError(["mkfs.ext4", "/dev/x"], 1, "bad"), ExitCode.INFRA),
    "detach before boot": ("detach:root", InfraError("stuck detaching"), ExitCode.INFRA),
    "attach swap": ("attach:swap@worker", InfraError("no device"), ExitCode.INFRA),
    "reset swap": ("reset_swap", OSError(5, "Input/output error"), ExitCode.INFRA),
    "attach to builder": ("attach:root@builder", InfraError("in use"), ExitCode.INFRA),
    "boot": ("boot", InfraError("console stream broke"), ExitCode.INFRA),
    "status": ("read_status", OSError(5, "Input/output error"), ExitCode.INFRA),
    "extract": ("extract", InfraError("manifest malformed"), ExitCode.INFRA),
    "a bug": ("extract", KeyError("bug"), ExitCode.INFRA),
}


@pytest.mark.parametrize(("where", "error", "code"), FAILURES.values(), ids=list(FAILURES))
def test_a_failure_in_any_phase_still_detaches_deletes_and_cleans_up(
    tmp_path: Path, where: str, error: BaseException, code: ExitCode
) -> None:
    world = World(tmp_path, faults={where: error})
    outcome = world.run()
    assert world.faults.fired, f"the fault at {where} never fired"
    assert outcome.exit_code == code
    assert str(error) in outcome.message or repr(error) in outcome.message
    assert "cleanup" in outcome.phases
    assert world.events[-1] == "backend.cleanup"
    world.assert_nothing_left()


def test_a_volume_whose_create_failed_half_way_is_still_deleted(tmp_path: Path) -> None:
    # e.g. CreateVolume succeeded but waiting for "available" timed out: the volume exists
    world = World(
        tmp_path, faults={"create:swap": DeadlineExceeded("never available")}, create_leaves_volume=True
    )
    outcome = world.run()
    assert outcome.exit_code == ExitCode.INFRA
    assert world.ledger.volumes["vol-swap"].deleted
    world.assert_nothing_left()


def test_the_machine_is_killed_before_its_volumes_are_taken_back(tmp_path: Path) -> None:
    world = World(tmp_path, faults={"boot": InfraError("console stream broke")})
    world.run()
    assert world.backend.kill_calls == 1
    assert world.ledger.index("kill") < world.ledger.index("delete:root")


def test_a_machine_that_stopped_on_its_own_is_not_killed(tmp_path: Path) -> None:
    world = World(tmp_path, faults={"extract": InfraError("x")})
    world.run()
    assert world.backend.kill_calls == 0
    world.assert_nothing_left()


def test_a_failed_delete_is_reported_and_the_rest_still_cleaned_up(tmp_path: Path) -> None:
    world = World(tmp_path, faults={"delete:swap": InfraError("DeleteVolume throttled")})
    outcome = world.run()
    assert outcome.exit_code == ExitCode.INFRA
    assert outcome.message.startswith("cleanup failed:")
    assert "vol-swap" in outcome.message
    assert world.ledger.volumes["vol-root"].deleted
    assert world.backend.cleanup_calls == 1
    assert world.ledger.violations == []


def test_a_failed_cleanup_does_not_hide_the_builds_own_failure(tmp_path: Path) -> None:
    world = World(tmp_path, status=1, faults={"backend.cleanup": InfraError("terminate failed")})
    outcome = world.run()
    assert outcome.exit_code == ExitCode.BUILD_FAILED
    assert world.ledger.violations == []


def test_a_failed_backend_cleanup_after_success_is_an_infrastructure_failure(tmp_path: Path) -> None:
    world = World(tmp_path, faults={"backend.cleanup": InfraError("terminate failed")})
    outcome = world.run()
    assert outcome.exit_code == ExitCode.INFRA
    assert "backend cleanup: terminate failed" in outcome.message


# --- statuses and exit codes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "result", "code", "extracted"),
    [
        (0, BootResult(ExitReason.POWERED_OFF), ExitCode.OK, True),
        (1, BootResult(ExitReason.POWERED_OFF), ExitCode.BUILD_FAILED, False),
        (2, BootResult(ExitReason.POWERED_OFF), ExitCode.UNCHANGED, True),
        (None, BootResult(ExitReason.POWERED_OFF), ExitCode.INFRA, False),
        (3, BootResult(ExitReason.POWERED_OFF), ExitCode.INFRA, False),
        (0, BootResult(ExitReason.TIMEOUT), ExitCode.INFRA, False),
        (0, BootResult(ExitReason.WATCHDOG), ExitCode.INFRA, False),
        (0, BootResult(ExitReason.CRASHED, detail="kernel panic"), ExitCode.INFRA, False),
    ],
    ids=["0", "1", "2", "none", "3", "timeout", "watchdog", "crash"],
)
def test_status_maps_to_the_exit_code(
    tmp_path: Path, status: int | None, result: BootResult, code: ExitCode, extracted: bool
) -> None:
    world = World(tmp_path, status=status, result=result)
    outcome = world.run()
    assert outcome.exit_code == code
    assert ("extract" in world.events) == extracted
    world.assert_nothing_left()


def test_no_status_says_what_is_probably_broken(tmp_path: Path) -> None:
    outcome = World(tmp_path, status=None).run()
    assert "no build status on the swap volume" in outcome.message


def test_a_crash_names_its_detail(tmp_path: Path) -> None:
    outcome = World(tmp_path, result=BootResult(ExitReason.CRASHED, detail="kernel panic")).run()
    assert outcome.message == "build machine crashed: kernel panic"


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (0, ExitCode.OK),
        (1, ExitCode.BUILD_FAILED),
        (2, ExitCode.UNCHANGED),
        (255, ExitCode.INFRA),
        (None, ExitCode.INFRA),
    ],
)
def test_directory_channel_takes_the_status_from_the_exit_code(
    tmp_path: Path, status: int | None, code: ExitCode
) -> None:
    world = World(
        tmp_path, channel="directory", swap=False, result=BootResult(ExitReason.EXITED, status=status)
    )
    outcome = world.run()
    assert outcome.exit_code == code
    assert "read_status" not in world.events
    assert "reset_swap" not in world.events
    if code in (ExitCode.OK, ExitCode.UNCHANGED):
        assert "extract" in world.events
    world.assert_nothing_left()


# --- volumes we do not own --------------------------------------------------------------------


@pytest.mark.parametrize("failure", [None, "boot", "extract"])
def test_supplied_volumes_are_detached_but_never_deleted(tmp_path: Path, failure: str | None) -> None:
    faults = {failure: InfraError("x")} if failure else None
    world = World(tmp_path, supplied=(Role.ROOT, Role.SWAP), faults=faults)
    outcome = world.run()
    assert outcome.exit_code == (ExitCode.INFRA if failure else ExitCode.OK)
    assert not any(e.startswith("delete") for e in world.events)
    world.assert_nothing_left()


def test_supplied_volumes_are_wiped_once_here_before_their_first_use(tmp_path: Path) -> None:
    world = World(tmp_path, supplied=(Role.ROOT, Role.SWAP))
    assert world.run().exit_code == ExitCode.OK
    events = world.events
    assert [e for e in events if e.startswith("wipe")] == ["wipe:root", "wipe:swap"]
    assert events.index("attach@worker:root") < events.index("wipe:root") < events.index("prepare_root")
    assert events.index("attach@worker:swap") < events.index("wipe:swap") < events.index("reset_swap")
    owned = World(tmp_path / "owned")
    assert owned.run().exit_code == ExitCode.OK
    assert not any(e.startswith("wipe") for e in owned.events)  # our own new volumes hold nothing


def test_a_supplied_root_with_an_owned_swap(tmp_path: Path) -> None:
    world = World(tmp_path, supplied=(Role.ROOT,))
    assert world.run().exit_code == ExitCode.OK
    assert "delete:swap" in world.events and "delete:root" not in world.events
    world.assert_nothing_left()


# --- the fakes are loud -----------------------------------------------------------------------


def test_the_fake_volume_refuses_to_be_deleted_while_attached(tmp_path: Path) -> None:
    world = World(tmp_path)
    pair = world.backend.volumes(Orchestrator(world.job, world.backend, world.steps, world.console).slot)
    pair.root.create()
    pair.root.attach()
    with pytest.raises(AssertionError, match="while attached"):
        pair.root.delete()
    with pytest.raises(AssertionError, match="while it is attached to worker"):
        pair.root.attach("builder")
    assert len(world.ledger.violations) == 2


# --- phases are logged with durations ---------------------------------------------------------


def test_every_phase_is_logged_with_its_duration_and_outcome(tmp_path: Path) -> None:
    world = World(tmp_path, faults={"extract": InfraError("manifest malformed")})
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        outcome = world.run()
    phases = [e for e in logs if e["event"] == "phase"]
    assert [e["phase"] for e in phases] == PHASES
    for event in phases:
        assert isinstance(event["seconds"], float) and event["seconds"] >= 0
        assert event["build"] == "b1"
        assert event["vm_type"] == "memory"
        assert event["log_level"] == "info"
    outcomes = {e["phase"]: e["outcome"] for e in phases}
    assert outcomes == {p: ("InfraError" if p == "extract" else "ok") for p in PHASES}
    assert outcome.phases == {e["phase"]: e["seconds"] for e in phases}
    finished = [e for e in logs if e["event"] == "build finished"]
    assert len(finished) == 1
    assert finished[0]["exit_code"] == 3 and finished[0]["message"] == "manifest malformed"


def test_a_phase_over_its_deadline_fails_with_deadline_exceeded(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.job = BuildJob(
        build_id="b1", dest=tmp_path / "d", workdir=tmp_path / "w", limits=PhaseLimits(verify=-1.0)
    )
    outcome = world.run()
    assert outcome.exit_code == ExitCode.INFRA
    assert "verify took longer than its deadline" in outcome.message
    world.assert_nothing_left()


def test_volume_events_carry_the_volume_and_role(tmp_path: Path) -> None:
    world = World(tmp_path, faults={"delete:root": InfraError("throttled")})
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        world.run()
    failed = [e for e in logs if e["event"] == "volume release failed"]
    assert len(failed) == 1
    assert (failed[0]["volume"], failed[0]["role"], failed[0]["phase"]) == ("vol-root", "root", "cleanup")


def test_a_cleanup_over_its_deadline_is_reported_not_raised(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.job = BuildJob(
        build_id="b1", dest=tmp_path / "d", workdir=tmp_path / "w", limits=PhaseLimits(cleanup=-1.0)
    )
    outcome = world.run()  # run() never raises for infrastructure failures
    assert outcome.exit_code == ExitCode.INFRA
    assert "cleanup took longer than its deadline" in outcome.message
    world.assert_nothing_left()
