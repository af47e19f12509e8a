"""The worker in an Auto Scaling group, end to end with the chroot backend: real `cloudbuild worker`
processes over sqs:// and s3:// (moto's server), the group in moto, the instance's view in the
fake IMDS. Each asserts nothing lost (one result) and nothing left (no message in flight)."""

from __future__ import annotations

import signal
from datetime import datetime
from pathlib import Path

import pytest

from cloudbuild.retry import wait_for
from cloudbuild.worker.fleet import LIFECYCLE_STATE, SPOT_ACTION
from tests.vm import localbuild
from tests.vm.localbuild import recipe
from tests.worker.awsfarm import AwsFarm, AwsQueues
from tests.worker.fleetlib import AsgWorld
from tests.worker.workerlib import slow_recipe

pytestmark = [pytest.mark.vm, pytest.mark.slow]
rootfs = localbuild.rootfs
cache = localbuild.cache
OPTS = ("--build-timeout", "600", "--lease", "30")


def _finish_elsewhere(farm: AwsFarm, rootfs: Path, monkeypatch: pytest.MonkeyPatch, job_id: str) -> None:
    """A second worker, off the group (no IMDS), takes the released job and finishes it."""
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    other = farm.start_worker(rootfs, *OPTS, "--max-jobs", "1", worker_id="w2")
    assert other.wait(timeout=300) == 0, farm.worker_log("w2")[-3000:]
    status = farm.status(job_id)
    assert (status["state"], status["attempt"]) == ("done", 2)


def test_lifecycle_termination_mid_build_drains_then_completes_the_hook(
    aws_farm: AwsFarm, aws_queues: AwsQueues, asg_world: AsgWorld, rootfs: Path, tmp_path: Path
) -> None:
    job_id = aws_farm.submit(slow_recipe(tmp_path / "slow", 6))
    worker = aws_farm.start_worker(rootfs, *OPTS)
    aws_farm.wait_state(job_id, "running")
    assert asg_world.instance()["ProtectedFromScaleIn"] is True
    asg_world.imds.metadata[LIFECYCLE_STATE] = "Terminated"
    assert worker.wait(timeout=300) == 0, aws_farm.worker_log()[-3000:]
    status = aws_farm.status(job_id)
    assert (status["state"], status["attempt"]) == ("done", 1)
    completes = asg_world.calls("complete")
    assert [c["LifecycleActionResult"] for c in completes] == ["CONTINUE"]
    assert asg_world.calls("heartbeat")  # sent while the build ran
    finished = datetime.fromisoformat(status["finished"]).timestamp()
    assert asg_world.lifecycle[-1][0] == "complete" and asg_world.lifecycle[-1][2] >= int(finished)
    assert asg_world.instance()["ProtectedFromScaleIn"] is False
    assert aws_farm.queue.depth() == {"visible": 0, "in_flight": 0}


def test_drain_timeout_releases_the_job_and_attempt_2_succeeds_elsewhere(
    aws_farm: AwsFarm,
    aws_queues: AwsQueues,
    asg_world: AsgWorld,
    rootfs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = aws_farm.submit(slow_recipe(tmp_path / "slow", 30))
    worker = aws_farm.start_worker(rootfs, *OPTS, "--drain-timeout", "2")
    aws_farm.wait_state(job_id, "running")
    asg_world.imds.metadata[LIFECYCLE_STATE] = "Terminated"
    assert worker.wait(timeout=120) == 0, aws_farm.worker_log()[-3000:]
    assert aws_farm.store.status(job_id) is None
    assert aws_farm.queue.depth() == {"visible": 1, "in_flight": 0}  # released at once, not left invisible
    assert [c["LifecycleActionResult"] for c in asg_world.calls("complete")] == ["CONTINUE"]
    _finish_elsewhere(aws_farm, rootfs, monkeypatch, job_id)
    assert aws_farm.queue.depth() == {"visible": 0, "in_flight": 0}


def test_spot_notice_mid_build_releases_at_once_and_another_worker_finishes(
    aws_farm: AwsFarm,
    aws_queues: AwsQueues,
    asg_world: AsgWorld,
    rootfs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = aws_farm.submit(slow_recipe(tmp_path / "slow", 20))
    worker = aws_farm.start_worker(rootfs, *OPTS)
    aws_farm.wait_state(job_id, "running")
    asg_world.imds.metadata[SPOT_ACTION] = '{"action": "terminate", "time": "2026-11-30T20:02:00Z"}'
    assert worker.wait(timeout=60) == 0, aws_farm.worker_log()[-3000:]
    assert aws_farm.queue.depth() == {"visible": 1, "in_flight": 0}
    assert asg_world.calls("complete") == []
    _finish_elsewhere(aws_farm, rootfs, monkeypatch, job_id)
    assert aws_queues.dead() == []


def test_exit_4_marks_the_instance_unhealthy_and_another_worker_does_the_job(
    aws_farm: AwsFarm,
    aws_queues: AwsQueues,
    asg_world: AsgWorld,
    rootfs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = aws_farm.submit(recipe(tmp_path / "src", "echo hi\n"))
    broken = aws_farm.start_worker(rootfs, *OPTS, vm="kvm")  # kvm_pvm here: the build exits 4
    assert broken.wait(timeout=120) == 4, aws_farm.worker_log()[-3000:]
    assert asg_world.instance()["HealthStatus"].upper() == "UNHEALTHY"
    assert asg_world.instance()["ProtectedFromScaleIn"] is False  # the group may replace it now
    assert aws_farm.queue.depth() == {"visible": 1, "in_flight": 0}
    _finish_elsewhere(aws_farm, rootfs, monkeypatch, job_id)


def test_idle_exit_terminates_the_instance_once_and_never_below_the_minimum(
    aws_farm: AwsFarm, aws_queues: AwsQueues, asg_world: AsgWorld, rootfs: Path
) -> None:
    asg_world.shrink_to(1)  # desired == min: the idle worker must stay
    kept = aws_farm.start_worker(rootfs, *OPTS, "--idle-exit", "1")
    wait_for(
        lambda: aws_farm.worker_log().count("group is at its minimum size") >= 2 or None,
        what="two refused idle exits", timeout=60, interval=0.2,
    )  # fmt: skip
    assert kept.poll() is None and asg_world.calls("terminate") == []
    kept.send_signal(signal.SIGTERM)
    assert kept.wait(timeout=60) == 0
    asg_world.shrink_to(2)
    leaving = aws_farm.start_worker(rootfs, *OPTS, "--idle-exit", "1", worker_id="w2")
    assert leaving.wait(timeout=60) == 0, aws_farm.worker_log("w2")[-3000:]
    assert [c["InstanceId"] for c in asg_world.calls("terminate")] == [asg_world.instance_id]
    assert asg_world.group()["DesiredCapacity"] == 1
