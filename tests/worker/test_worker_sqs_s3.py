"""The worker end to end over sqs:// and s3:// (moto's server, real HTTP) with the chroot backend:
real `cloudbuild submit`, `worker`, `status` and `results` processes."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cloudbuild.retry import wait_for
from cloudbuild.worker.s3store import S3Store
from tests.fakes.tcpgate import TcpGate
from tests.vm import localbuild
from tests.vm.localbuild import recipe, sha, tree
from tests.worker.awsfarm import AwsFarm, AwsQueues
from tests.worker.workerlib import slow_recipe

pytestmark = [pytest.mark.vm, pytest.mark.slow]
rootfs = localbuild.rootfs
cache = localbuild.cache


def test_submit_work_results_byte_exact_over_sqs_and_s3(
    aws_farm: AwsFarm, aws_queues: AwsQueues, rootfs: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(200_000)
    (src / "input.bin").write_bytes(payload)
    script = recipe(src, "mkdir -p $BUILD_RESULTS/RPMS\ncp input.bin $BUILD_RESULTS/RPMS/input.bin\n"
                    "ln -s RPMS/input.bin $BUILD_RESULTS/latest\necho built it\n")  # fmt: skip
    job_id = aws_farm.submit(script)
    worker = aws_farm.start_worker(rootfs, "--max-jobs", "1", "--build-timeout", "600")
    assert worker.wait(timeout=300) == 0, aws_farm.worker_log()[-3000:]
    assert aws_farm.status_line(job_id) == f"{job_id}: done (exit 0) attempt 1"
    dest = tmp_path / "res"
    fetched = aws_farm.cli("results", "--store", aws_farm.store_url, job_id, "--dest", str(dest))
    assert fetched.returncode == 0, fetched.stderr
    assert tree(dest) == {"RPMS": "d", "RPMS/input.bin": sha(payload), "latest": "l:RPMS/input.bin"}
    assert "built it" in aws_farm.cli("logs", "--store", aws_farm.store_url, job_id).stdout
    assert aws_farm.queue.depth() == {"visible": 0, "in_flight": 0}  # deleted once the result was stored
    assert any(k.endswith(f"jobs/{job_id}/status.json") for k in aws_queues.keys("farm/"))


def test_a_build_timeout_beyond_sqs_12h_cap_is_refused_at_start_up(aws_farm: AwsFarm, rootfs: Path) -> None:
    worker = aws_farm.start_worker(rootfs, "--build-timeout", str(12 * 3600))
    assert worker.wait(timeout=60) == 1
    assert "SQS keeps a message invisible at most 12 h" in aws_farm.worker_log()
    worker = aws_farm.start_worker(rootfs, worker_id="w2")  # no --build-timeout: unbounded, refused too
    assert worker.wait(timeout=60) == 1
    assert "so a build may run forever" in aws_farm.worker_log("w2")
    worker = aws_farm.start_worker(rootfs, "--build-timeout", "600", "--allow", "build-timeout", worker_id="w3")
    assert worker.wait(timeout=60) == 1  # a job could ask for any timeout
    assert "so a build may run forever" in aws_farm.worker_log("w3")


def test_worker_sigkilled_mid_build_another_finishes_after_the_lease(
    aws_farm: AwsFarm, aws_queues: AwsQueues, rootfs: Path, tmp_path: Path
) -> None:
    job_id = aws_farm.submit(slow_recipe(tmp_path / "slow", 4))
    first = aws_farm.start_worker(rootfs, "--lease", "3", "--build-timeout", "600")
    aws_farm.wait_state(job_id, "running")
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = aws_farm.start_worker(rootfs, "--lease", "3", "--build-timeout", "600", "--max-jobs", "1", worker_id="w2")
    assert second.wait(timeout=300) == 0, aws_farm.worker_log("w2")[-3000:]
    status = aws_farm.status(job_id)
    assert (status["state"], status["attempt"]) == ("done", 2)
    assert aws_farm.queue.depth() == {"visible": 0, "in_flight": 0}
    assert aws_queues.dead() == []


def test_a_poison_job_lands_in_the_dlq_after_max_receive_count_attempts(
    aws_farm: AwsFarm, aws_queues: AwsQueues, rootfs: Path, tmp_path: Path
) -> None:
    job_id = aws_farm.submit(slow_recipe(tmp_path / "src", 30), "--timeout", "1")  # times out: exit 3
    worker = aws_farm.start_worker(rootfs, "--build-timeout", "600", "--idle-exit", "3")
    assert worker.wait(timeout=300) == 0, aws_farm.worker_log()[-3000:]
    status = aws_farm.status(job_id)
    assert (status["state"], status["attempt"]) == ("failed-permanently", 3)  # maxReceiveCount of the redrive policy
    dead = aws_queues.dead()
    assert [m["MessageAttributes"]["cloudbuild-job-id"]["StringValue"] for m in dead] == [job_id]
    assert aws_farm.queue.depth() == {"visible": 0, "in_flight": 0}


def test_s3_unreachable_for_a_while_is_retried_and_the_job_is_not_lost(
    aws_farm: AwsFarm, aws_queues: AwsQueues, rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = aws_farm.submit(slow_recipe(tmp_path / "slow", 3))
    host, port = urlsplit(os.environ["AWS_ENDPOINT_URL"]).netloc.split(":")
    gate = TcpGate(host, int(port))
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", gate.url)  # the worker reaches S3 through the gate
    worker = aws_farm.start_worker(rootfs, "--build-timeout", "600", "--max-jobs", "1")
    aws_farm.wait_state(job_id, "running")
    gate.down()  # S3 gone while the build runs and when it publishes
    wait_for(lambda: '"retrying"' in aws_farm.worker_log() or None, what="a retry", timeout=120, interval=0.2)
    assert S3Store(aws_farm.store_url, s3=aws_queues.s3).status(job_id) is None  # past the gate
    gate.up()
    assert worker.wait(timeout=300) == 0, aws_farm.worker_log()[-3000:]
    status = aws_farm.status(job_id)
    assert (status["state"], status["attempt"]) == ("done", 1)
    assert aws_farm.queue.depth() == {"visible": 0, "in_flight": 0}
    gate.down()
