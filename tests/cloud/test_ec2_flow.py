"""A whole build through `cloudbuild.build.run_build` with moto as EC2 and an emulated host/builder."""

from __future__ import annotations

from cloudbuild.build import BuildJob, PhaseLimits, run_build
from cloudbuild.errors import ExitCode
from tests.fakes.moto_server import (  # noqa: F401 - fixtures
    Ec2World,
    FakeHostSteps,
    ListConsole,
    aws_fixture,
    console_from_emulator_fixture,
    ec2_leftovers_fixture,
    ec2_world_fixture,
    moto_server_fixture,
)


def job(world: Ec2World, build_id: str = "b1", **limits: float) -> BuildJob:
    return BuildJob(
        build_id, world.tmp / f"dest-{build_id}", world.tmp / f"work-{build_id}", limits=PhaseLimits(**limits)
    )


def test_build_runs_on_a_builder_and_leaves_nothing(ec2_world: Ec2World) -> None:
    console = ListConsole()
    steps = FakeHostSteps()
    outcome = run_build(job(ec2_world), ec2_world.backend(), steps, console)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert (ec2_world.tmp / "dest-b1" / "result").read_bytes().startswith(b"RESULT-OF-i-")
    assert b"root staged ok" in console.text
    assert steps.calls == ["prepare_root", "reset_swap", "read_status", "extract"]
