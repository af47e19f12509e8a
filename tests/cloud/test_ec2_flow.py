"""A whole build through `cloudbuild.build.run_build` with moto as EC2 and an emulated host/builder."""

from __future__ import annotations

import datetime as dt
import threading

import pytest

from cloudbuild.backend import KILL_MARKER
from cloudbuild.build import BuildJob, PhaseLimits, run_build
from cloudbuild.cloud.common import TAG_POOL, parse_time, utcnow
from cloudbuild.cloud.ec2.api import Ec2Limits
from cloudbuild.errors import ExitCode
from cloudbuild.volume import TAG_BUILD, TAG_EXPIRES, TAG_OWNER, TAG_ROLE
from tests.fakes import timings
from tests.fakes.console import RecordingConsole
from tests.fakes.hoststeps import FakeHostSteps
from tests.fakes.moto_server import BuilderRun, Ec2World, Faults, fake_build, moto_backend


def job(world: Ec2World, build_id: str = "b1", **limits: float) -> BuildJob:
    return BuildJob(
        build_id, world.tmp / f"dest-{build_id}", world.tmp / f"work-{build_id}", limits=PhaseLimits(**limits)
    )


def test_build_runs_on_a_builder_and_leaves_nothing(ec2_world: Ec2World) -> None:
    console = RecordingConsole()
    steps = FakeHostSteps()
    outcome = run_build(job(ec2_world), ec2_world.backend(), steps, console)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert (ec2_world.tmp / "dest-b1" / "result").read_bytes().startswith(b"RESULT-OF-i-")
    assert b"root staged ok" in console.text
    assert steps.calls == ["prepare_root", "reset_swap", "read_status", "extract"]


def test_stale_kill_marker_of_an_earlier_build_does_not_fail_this_one(ec2_world: Ec2World) -> None:
    the_job = job(ec2_world)
    the_job.workdir.mkdir(parents=True)
    (the_job.workdir / KILL_MARKER).write_text("killed\n")  # an earlier build's kill, kept --root
    outcome = run_build(the_job, ec2_world.backend(), FakeHostSteps(), RecordingConsole())
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert (ec2_world.tmp / "dest-b1" / "result").read_bytes().startswith(b"RESULT-OF-i-")


def test_failed_build_is_exit_1_and_cleans_up(ec2_world: Ec2World) -> None:
    ec2_world.emulator.play = fake_build(1)
    outcome = run_build(job(ec2_world), ec2_world.backend(), FakeHostSteps(), RecordingConsole())
    assert outcome.exit_code == ExitCode.BUILD_FAILED


def test_console_is_streamed_incrementally_without_repeats(ec2_world: Ec2World) -> None:
    lines = [b"line %03d of the build log\n" % i for i in range(60)]

    def play(run: BuilderRun) -> None:
        fake_build(0)(run)
        for line in lines:
            run.console(line)
            threading.Event().wait(0.002)

    ec2_world.emulator.play = play
    console = RecordingConsole()
    outcome = run_build(job(ec2_world), ec2_world.backend(), FakeHostSteps(), console)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    text = console.text
    assert text.endswith(b"".join(lines))
    assert all(text.count(line) == 1 for line in lines)
    assert len(console.chunks) > 1  # it arrived in pieces, while the builder ran


def test_build_timeout_stops_the_builder_exit_3(ec2_world: Ec2World) -> None:
    release = threading.Event()

    def hang(run: BuilderRun) -> None:
        run.outcome = "hang"
        release.wait(10)

    ec2_world.emulator.play = hang
    try:
        outcome = run_build(
            job(ec2_world, boot=0.5), ec2_world.backend(), FakeHostSteps(), RecordingConsole()
        )
    finally:
        release.set()
    assert outcome.exit_code == ExitCode.INFRA
    assert "timeout" in outcome.message or "deadline" in outcome.message
    builders = ec2_world.emulator.runs
    state = ec2_world.ec2.describe_instances(InstanceIds=[builders[0].instance_id])["Reservations"][0][
        "Instances"
    ][0]
    assert state["State"]["Name"] == "terminated"


def test_builder_that_vanishes_is_exit_3(ec2_world: Ec2World) -> None:
    def vanish(run: BuilderRun) -> None:
        run.outcome = "vanish"

    ec2_world.emulator.play = vanish
    outcome = run_build(job(ec2_world), ec2_world.backend(), FakeHostSteps(), RecordingConsole())
    assert outcome.exit_code == ExitCode.INFRA and "crashed" in outcome.message


def test_no_capacity_for_the_builder_is_exit_3_and_volumes_go(ec2_world: Ec2World) -> None:
    faults = Faults(ec2_world.ec2)
    faults.fail("RunInstances", "InsufficientInstanceCapacity", times=1)
    outcome = run_build(job(ec2_world), ec2_world.backend(), FakeHostSteps(), RecordingConsole())
    assert outcome.exit_code == ExitCode.INFRA and "InsufficientInstanceCapacity" in outcome.message
    assert faults.count("DeleteVolume") == 2


def test_instance_quota_is_exit_3(ec2_world: Ec2World) -> None:
    Faults(ec2_world.ec2).fail("RunInstances", "InstanceLimitExceeded", times=1)
    outcome = run_build(job(ec2_world), ec2_world.backend(), FakeHostSteps(), RecordingConsole())
    assert outcome.exit_code == ExitCode.INFRA


def test_attach_to_the_builder_timing_out_is_exit_3_and_terminates_it(ec2_world: Ec2World) -> None:
    faults = Faults(ec2_world.ec2)
    builder_ids: list[str] = []
    faults.after("RunInstances", lambda parsed: builder_ids.append(parsed["Instances"][0]["InstanceId"]))
    faults.swallow(
        "AttachVolume",
        {"State": "attaching"},
        times=5,
        when=lambda body: body.get("InstanceId") != ec2_world.worker_id,
    )
    limits = Ec2Limits(**{**timings.EC2.__dict__, "attach": 0.3, "flip_grace": 10.0})
    outcome = run_build(job(ec2_world), ec2_world.backend(limits=limits), FakeHostSteps(), RecordingConsole())
    assert outcome.exit_code == ExitCode.INFRA
    state = ec2_world.ec2.describe_instances(InstanceIds=builder_ids)["Reservations"][0]["Instances"][0][
        "State"
    ]
    assert state["Name"] == "terminated"


def test_warm_pool_reuses_a_stopped_builder(ec2_world: Ec2World) -> None:
    ec2_world.aws.allow_pool = True
    faults = Faults(ec2_world.ec2)
    first = run_build(
        job(ec2_world, "b1"), ec2_world.backend(ec2_pool=1), FakeHostSteps(), RecordingConsole()
    )
    assert first.exit_code == ExitCode.OK, first.message
    assert (faults.count("RunInstances"), faults.count("StartInstances")) == (1, 0)
    pool = ec2_world.ec2.describe_instances(
        Filters=[{"Name": f"tag:{TAG_POOL}", "Values": [ec2_world.worker_id]}]
    )
    members = [i for r in pool["Reservations"] for i in r["Instances"]]
    assert [m["State"]["Name"] for m in members] == ["stopped"]
    during: dict[str, str] = {}

    def play(run: BuilderRun) -> None:  # the claimed builder's tags while it builds b2
        instance = ec2_world.ec2.describe_instances(InstanceIds=[run.instance_id])["Reservations"][0]
        during.update({t["Key"]: t["Value"] for t in instance["Instances"][0]["Tags"]})
        fake_build(0)(run)

    ec2_world.emulator.play = play
    second = run_build(
        job(ec2_world, "b2"), ec2_world.backend(ec2_pool=1), FakeHostSteps(), RecordingConsole()
    )
    assert second.exit_code == ExitCode.OK, second.message
    assert (faults.count("RunInstances"), faults.count("StartInstances")) == (1, 1)
    assert [r.instance_id for r in ec2_world.emulator.runs] == [members[0]["InstanceId"]] * 2
    # claimed: re-tagged for b2 (gc sees a build with a fresh lease, not an idle pool member)
    assert (during[TAG_BUILD], during[TAG_ROLE], during[TAG_POOL]) == ("b2", "builder", ec2_world.worker_id)
    lease = parse_time(during[TAG_EXPIRES])
    assert lease is not None and lease > utcnow() + dt.timedelta(hours=1)
    assert (ec2_world.tmp / "dest-b2" / "result").read_bytes() == b"RESULT-OF-" + members[0][
        "InstanceId"
    ].encode()
    # the pool member carries no build and is swept only with its worker
    tags = {
        t["Key"]: t["Value"]
        for t in ec2_world.ec2.describe_instances(InstanceIds=[members[0]["InstanceId"]])["Reservations"][0][
            "Instances"
        ][0]["Tags"]
    }
    assert tags[TAG_BUILD] == "" and tags[TAG_OWNER] == ec2_world.worker_id
    ec2_world.ec2.terminate_instances(InstanceIds=[members[0]["InstanceId"]])


def test_a_pool_builder_whose_build_timed_out_is_terminated_not_pooled(ec2_world: Ec2World) -> None:
    ec2_world.aws.allow_pool = True
    release = threading.Event()

    def hang(run: BuilderRun) -> None:
        run.outcome = "hang"
        release.wait(10)

    ec2_world.emulator.play = hang
    try:
        outcome = run_build(
            job(ec2_world, boot=0.5), ec2_world.backend(ec2_pool=2), FakeHostSteps(), RecordingConsole()
        )
    finally:
        release.set()
    assert outcome.exit_code == ExitCode.INFRA, outcome.message
    builder = ec2_world.emulator.runs[0].instance_id
    info = ec2_world.ec2.describe_instances(InstanceIds=[builder])["Reservations"][0]["Instances"][0]
    assert info["State"]["Name"] in ("terminated", "shutting-down")


def test_verify_needs_an_ami_and_creates_nothing(ec2_world: Ec2World) -> None:
    faults = Faults(ec2_world.ec2)
    outcome = run_build(
        job(ec2_world), ec2_world.backend(ec2_builder_ami=None), FakeHostSteps(), RecordingConsole()
    )
    assert outcome.exit_code == ExitCode.BUILD_FAILED and "--ec2-builder-ami" in outcome.message
    assert faults.count("CreateVolume") == 0


def test_subnet_in_another_zone_is_refused(ec2_world: Ec2World) -> None:
    vpc = ec2_world.ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2_world.ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24", AvailabilityZone="us-east-1b")[
        "Subnet"
    ]["SubnetId"]
    outcome = run_build(
        job(ec2_world), ec2_world.backend(ec2_subnet=subnet), FakeHostSteps(), RecordingConsole()
    )
    assert outcome.exit_code == ExitCode.BUILD_FAILED and "us-east-1b" in outcome.message


def test_identity_comes_from_imds_when_not_given(ec2_world: Ec2World) -> None:
    outcome = run_build(job(ec2_world), ec2_world.backend(via_imds=True), FakeHostSteps(), RecordingConsole())
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert any(r[1] == "/latest/api/token" for r in ec2_world.imds.requests)


def test_backend_is_registered_as_ec2() -> None:
    from cloudbuild.backend import backend_class
    from cloudbuild.cloud.ec2.backend import Ec2Backend

    assert backend_class("ec2") is Ec2Backend and Ec2Backend.channel == "swap"


def test_watchdog_marker_left_open_kills_the_builder_exit_3(
    ec2_world: Ec2World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOUDBUILD_WATCHDOG_TIMEOUT", "0.3")
    release = threading.Event()

    def hang_in_boot(run: BuilderRun) -> None:
        run.console(b"[    0.000000] Linux version 6.1 (builder)\n")  # ... and never reaches the 2nd stage
        run.outcome = "hang"
        release.wait(10)

    ec2_world.emulator.play = hang_in_boot
    console = RecordingConsole()
    try:
        outcome = run_build(job(ec2_world), ec2_world.backend(watchdog=True), FakeHostSteps(), console)
    finally:
        release.set()
    assert outcome.exit_code == ExitCode.INFRA and "watchdog" in outcome.message
    assert b"### WATCHDOG TRIGGERED, KILLING VM ###" in console.text
    builder = ec2_world.emulator.runs[0].instance_id
    state = ec2_world.ec2.describe_instances(InstanceIds=[builder])["Reservations"][0]["Instances"][0][
        "State"
    ]
    assert state["Name"] == "terminated"


def test_builder_stuck_pending_is_exit_3_and_terminated(ec2_world: Ec2World) -> None:
    faults = Faults(ec2_world.ec2)
    builders: list[str] = []

    def stuck(parsed: dict[str, object]) -> None:
        instance_id = parsed["Instances"][0]["InstanceId"]  # type: ignore[index]
        builders.append(instance_id)
        moto_backend().get_instance(instance_id)._state.name = "pending"

    faults.after("RunInstances", stuck)
    limits = Ec2Limits(**{**timings.EC2.__dict__, "running": 0.3})
    outcome = run_build(job(ec2_world), ec2_world.backend(limits=limits), FakeHostSteps(), RecordingConsole())
    assert outcome.exit_code == ExitCode.INFRA and "to run" in outcome.message
    state = ec2_world.ec2.describe_instances(InstanceIds=builders)["Reservations"][0]["Instances"][0]["State"]
    assert state["Name"] == "terminated"
    assert faults.count("AttachVolume") == 2  # only the two attaches here, none to the builder


def test_two_slots_build_at_once_on_one_worker(ec2_world: Ec2World) -> None:
    outcomes: dict[str, object] = {}

    def build(build_id: str, slot: int) -> None:
        slot_job = BuildJob(
            build_id, ec2_world.tmp / f"dest-{build_id}", ec2_world.tmp / f"work-{build_id}", slot=slot
        )
        outcomes[build_id] = run_build(slot_job, ec2_world.backend(), FakeHostSteps(), RecordingConsole())

    threads = [threading.Thread(target=build, args=(f"s{slot}", slot)) for slot in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for build_id in ("s0", "s1"):
        outcome = outcomes[build_id]
        assert getattr(outcome, "exit_code", None) == ExitCode.OK, getattr(outcome, "message", outcome)
        result = (ec2_world.tmp / f"dest-{build_id}" / "result").read_bytes()
        assert result.startswith(b"RESULT-OF-i-")
    builders = {r.instance_id for r in ec2_world.emulator.runs}
    assert len(builders) == 2  # each slot had its own builder and read back its own result
    assert (ec2_world.tmp / "dest-s0" / "result").read_bytes() != (
        ec2_world.tmp / "dest-s1" / "result"
    ).read_bytes()


def test_gc_through_the_cli_dispatcher(ec2_world: Ec2World) -> None:
    from cloudbuild import cli

    assert cli.main(["gc", "--vm-type", "ec2", "--dry-run", "--log-format", "json"]) == 0


def test_cloudbuild_kill_stops_the_builder_and_the_build_fails_exit_1(ec2_world: Ec2World) -> None:
    from cloudbuild.commands import kill

    building = threading.Event()
    release = threading.Event()

    def hang(run: BuilderRun) -> None:
        run.outcome = "hang"
        building.set()
        release.wait(10)

    ec2_world.emulator.play = hang
    outcomes: list[object] = []
    the_job = job(ec2_world, "victim")
    the_job.workdir.mkdir(parents=True)
    thread = threading.Thread(
        target=lambda: outcomes.append(
            run_build(the_job, ec2_world.backend(), FakeHostSteps(), RecordingConsole())
        )
    )
    thread.start()
    try:
        assert building.wait(30)
        argv = [
            "--vm-type",
            "ec2",
            "--build-id",
            "victim",
            "--root",
            str(the_job.workdir),
            "--log-format",
            "json",
        ]
        assert kill.main([*argv, "--ec2-builder-ami", ec2_world.ami]) == 0
        thread.join(30)
    finally:
        release.set()
    outcome = outcomes[0]
    assert getattr(outcome, "exit_code", None) == ExitCode.BUILD_FAILED, getattr(outcome, "message", outcome)
    builder = ec2_world.emulator.runs[0].instance_id
    state = ec2_world.ec2.describe_instances(InstanceIds=[builder])["Reservations"][0]["Instances"][0][
        "State"
    ]
    assert state["Name"] == "terminated"
