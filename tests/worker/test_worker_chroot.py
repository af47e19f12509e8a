"""The worker end to end with the chroot backend (fast): real `cloudbuild worker`, `submit`,
`status`, `results` and `logs` processes over a dir:// queue and store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from cloudbuild.retry import wait_for
from cloudbuild.worker.job import MAX_JOB_BYTES
from tests.vm import localbuild
from tests.vm.localbuild import CLI, mounts_under, processes_mentioning, recipe, sha, tree
from tests.worker.workerlib import Farm, farm, slow_recipe

pytestmark = [pytest.mark.vm, pytest.mark.slow]
rootfs = localbuild.rootfs
cache = localbuild.cache
__all__ = ["farm"]


def test_three_jobs_two_slots_results_byte_exact(farm: Farm, rootfs: Path, tmp_path: Path) -> None:
    payloads = {}
    jobs = []
    for n in range(3):
        src = tmp_path / f"src{n}"
        src.mkdir()
        payloads[n] = os.urandom(300_000 + n)
        (src / "input.bin").write_bytes(payloads[n])
        script = recipe(
            src,
            "mkdir -p $BUILD_RESULTS/RPMS\ncp input.bin $BUILD_RESULTS/RPMS/input.bin\n"
            "ln -s RPMS/input.bin $BUILD_RESULTS/latest\necho built job $(cat /proc/cpuinfo | grep -c processor) cpus\n",
        )
        jobs.append(farm.submit(script, "--option", "jobs=2", "--label", f"n={n}"))
    failing = farm.submit(recipe(tmp_path / "bad", "echo about to fail\nexit 7\n"))
    assert all(farm.status_line(j) == f"{j}: queued" for j in jobs)
    worker = farm.start_worker(rootfs, "--slots", "2", "--max-jobs", "4", "--allow", "jobs=4")
    assert worker.wait(timeout=300) == 0, farm.worker_log()[-3000:]
    for n, job_id in enumerate(jobs):
        assert farm.status_line(job_id) == f"{job_id}: done (exit 0) attempt 1"
        dest = tmp_path / f"res{n}"
        fetched = farm.cli("results", "--store", farm.store_url, job_id, "--dest", str(dest))
        assert fetched.returncode == 0, fetched.stderr
        assert tree(dest) == {"RPMS": "d", "RPMS/input.bin": sha(payloads[n]), "latest": "l:RPMS/input.bin"}
        assert "built job" in Path(f"{dest}.log").read_text()
        assert "MAX_mb_used_on_disk" in Path(f"{dest}.statistics").read_text()
        logs = farm.cli("logs", "--store", farm.store_url, job_id)
        assert "built job" in logs.stdout
    assert farm.status(failing)["exit_code"] == 1
    assert "about to fail" in farm.cli("logs", "--store", farm.store_url, failing).stdout
    bad = farm.cli("results", "--store", farm.store_url, failing, "--dest", str(tmp_path / "badres"))
    assert bad.returncode == 1 and "done (exit 1)" in bad.stdout
    assert farm.queue.counts() == {"pending": 0, "claimed": 0, "done": 4, "dead": 0}
    events = [line for line in farm.worker_log().splitlines() if '"job finished"' in line]
    assert len(events) == 4 and all('"slot"' in e and '"attempt"' in e and '"job"' in e for e in events)
    slots_used = {e.split('"slot": ')[1].split(",")[0] for e in events}
    assert slots_used == {"0", "1"}
    assert list((tmp_path / "work-w1" / "slots").glob("*/tmp/cloudbuild-*")) == []  # build folders removed


KEY = "sha256-" + "0" * 64


def _put_raw(farm: Farm, message_id: str, body: bytes) -> None:
    farm.queue.put(message_id, body)


def test_every_rejected_job_is_stored_with_its_reason_and_never_retried(
    farm: Farm, rootfs: Path, tmp_path: Path
) -> None:
    good = farm.submit(recipe(tmp_path / "ok", "echo fine\n"))
    doc = farm.queue.claim("peek", lease=60)  # a real job document to vary (this delivery counts)
    assert doc is not None
    farm.queue.release(doc)

    body = json.loads(doc.body)
    cases = {
        "malformed": (b"{oops", "not valid JSON"),
        "version": (json.dumps({**body, "id": "version", "version": 9}).encode(), "version 9 is unknown"),
        "oversized": (b"{" + b" " * MAX_JOB_BYTES + b"}", "over the limit"),
        "vmtype": (
            json.dumps({**body, "id": "vmtype", "options": {"vm-type": "qemu"}}).encode(),
            "'--vm-type' is not allowed",
        ),
        "volumes": (
            json.dumps({**body, "id": "volumes", "options": {"vm-volumes": "vol-1"}}).encode(),
            "'--vm-volumes' is not allowed",
        ),
        "ami": (
            json.dumps({**body, "id": "ami", "options": {"ec2-builder-ami": "ami-1"}}).encode(),
            "'--ec2-builder-ami' is not allowed",
        ),
        "root": (
            json.dumps({**body, "id": "root", "options": {"root": "/etc"}}).encode(),
            "'--root' is not allowed",
        ),
        "limit": (
            json.dumps({**body, "id": "limit", "options": {"vm-memory": "4096"}}).encode(),
            "over this worker's limit of 1024",
        ),
        "norecipe": (
            json.dumps({**body, "id": "norecipe", "recipe": KEY}).encode(),
            "does not exist in the store",
        ),
        "norootfs": (json.dumps({**body, "id": "norootfs", "rootfs": KEY}).encode(), "field 'rootfs'"),
        "noscript": (
            json.dumps({**body, "id": "noscript", "script": "missing.sh"}).encode(),
            "field 'script'",
        ),
        "otherid": (json.dumps({**body, "id": "someone-else"}).encode(), "differs from its queue message id"),
    }
    for message_id, (raw, _) in cases.items():
        _put_raw(farm, message_id, raw)
    worker = farm.start_worker(rootfs, "--idle-exit", "2", "--allow", "vm-memory=1G")
    assert worker.wait(timeout=300) == 0, farm.worker_log()[-3000:]
    for message_id, (_, reason) in cases.items():
        line = farm.status_line(message_id)
        assert line.startswith(f"{message_id}: failed-permanently: "), line
        assert reason in line, line
    assert farm.status_line(good).endswith("done (exit 0) attempt 2")
    counts = farm.queue.counts()
    assert counts == {"pending": 0, "claimed": 0, "done": len(cases) + 1, "dead": 0}  # none retried
    assert '"job rejected"' in farm.worker_log()


def test_submit_refuses_options_no_job_may_set(farm: Farm, tmp_path: Path) -> None:
    script = recipe(tmp_path / "src", "true\n")
    proc = farm.cli(
        "submit",
        "--queue",
        farm.queue_url,
        "--store",
        farm.store_url,
        "--option",
        "vm-type=qemu",
        str(script),
    )
    assert proc.returncode == 1
    assert "--option vm-type: jobs may never set it" in proc.stderr
    assert (
        not (tmp_path / "queue" / "pending").exists()
        or list((tmp_path / "queue" / "pending").iterdir()) == []
    )


def test_sigterm_drains_then_a_second_worker_finishes_the_job_exactly_once(
    farm: Farm, rootfs: Path, tmp_path: Path
) -> None:
    job = farm.submit(slow_recipe(tmp_path / "src", 6))
    first = farm.start_worker(rootfs, "--drain-timeout", "1", worker_id="w1")
    farm.wait_state(job, "running")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0  # drained: not failed, not lost
    state = farm.store.state(job)
    assert state is not None and state["state"] == "queued" and state["attempt"] == 1
    assert farm.store.status(job) is None
    second = farm.start_worker(rootfs, "--max-jobs", "1", worker_id="w2")
    assert second.wait(timeout=120) == 0
    status = farm.status(job)
    assert (status["state"], status["exit_code"], status["attempt"], status["worker"]) == ("done", 0, 2, "w2")
    assert farm.queue.counts() == {"pending": 0, "claimed": 0, "done": 1, "dead": 0}
    assert len(list((tmp_path / "store" / "jobs" / job / "attempts").iterdir())) == 1


def test_sigterm_lets_a_running_build_finish_within_the_drain_timeout(
    farm: Farm, rootfs: Path, tmp_path: Path
) -> None:
    job = farm.submit(slow_recipe(tmp_path / "src", 3))
    worker = farm.start_worker(rootfs, "--drain-timeout", "120")
    farm.wait_state(job, "running")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=120) == 0
    assert farm.status_line(job) == f"{job}: done (exit 0) attempt 1"


def test_a_second_sigterm_stops_the_build_at_once_and_still_releases(
    farm: Farm, rootfs: Path, tmp_path: Path
) -> None:
    job = farm.submit(slow_recipe(tmp_path / "src", 60))
    worker = farm.start_worker(rootfs, "--drain-timeout", "600")
    farm.wait_state(job, "running")
    worker.send_signal(signal.SIGTERM)
    # two signals sent at once may arrive as one: the second after the first was taken
    wait_for(lambda: '"draining"' in farm.worker_log(), what="the worker to drain", timeout=60, interval=0.1)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0
    assert farm.store.state(job) == {**(farm.store.state(job) or {}), "state": "queued", "attempt": 1}
    assert farm.queue.counts()["pending"] == 1


def test_sigkill_lease_expires_another_worker_reclaims_and_the_next_start_sweeps(
    farm: Farm, rootfs: Path, tmp_path: Path
) -> None:
    job = farm.submit(slow_recipe(tmp_path / "src", 5))
    first = farm.start_worker(rootfs, "--lease", "3", worker_id="w1")
    farm.wait_state(job, "running")
    first.send_signal(signal.SIGKILL)
    first.wait()
    slot = tmp_path / "work-w1" / "slots" / "0"
    assert slot.exists()  # what the killed worker left
    # its build got SIGTERM with it (PR_SET_PDEATHSIG) and stopped on its own
    wait_for(
        lambda: processes_mentioning(str(slot)) == [],
        what="the orphaned build to stop",
        timeout=60,
        interval=0.2,
    )
    second = farm.start_worker(rootfs, "--max-jobs", "1", worker_id="w2")
    assert second.wait(timeout=180) == 0, farm.worker_log("w2")[-3000:]
    status = farm.status(job)
    assert (status["state"], status["attempt"], status["worker"]) == ("done", 2, "w2")
    again = farm.start_worker(rootfs, "--idle-exit", "1", worker_id="w1")
    assert again.wait(timeout=60) == 0
    assert not slot.exists()  # swept by its next start
    assert '"start-up sweep"' in farm.worker_log("w1")


def test_a_restarted_worker_releases_its_own_stale_claim_without_waiting_for_the_lease(
    farm: Farm, rootfs: Path, tmp_path: Path
) -> None:
    job = farm.submit(slow_recipe(tmp_path / "src", 2))
    first = farm.start_worker(rootfs, "--lease", "3600", worker_id="w1")
    farm.wait_state(job, "running")
    first.send_signal(signal.SIGKILL)
    first.wait()
    again = farm.start_worker(rootfs, "--lease", "3600", "--max-jobs", "1", worker_id="w1")
    assert again.wait(timeout=120) == 0, farm.worker_log("w1")[-3000:]  # a 1 h lease: only the sweep frees it
    status = farm.status(job)
    assert (status["state"], status["attempt"]) == ("done", 2)
    assert f'"released": ["{job}"]' in farm.worker_log("w1")


def test_infrastructure_failures_are_retried_then_dead_lettered(
    farm: Farm, rootfs: Path, tmp_path: Path
) -> None:
    job = farm.submit(slow_recipe(tmp_path / "src", 30), "--timeout", "1")  # the build times out: exit 3
    worker = farm.start_worker(rootfs, "--max-attempts", "2", "--idle-exit", "3")
    assert worker.wait(timeout=300) == 0, farm.worker_log()[-3000:]
    status = farm.status(job)
    assert status["state"] == "failed-permanently" and status["attempt"] == 2
    assert "infrastructure failed 2 times (last exit 3): moved to dead-letter" in farm.status_line(job)
    assert farm.queue.counts() == {"pending": 0, "claimed": 0, "done": 0, "dead": 1}


def test_exit_4_releases_the_job_and_the_worker_exits_4(farm: Farm, rootfs: Path, tmp_path: Path) -> None:
    job = farm.submit(recipe(tmp_path / "src", "echo hi\n"))
    worker = farm.start_worker(rootfs, worker_id="broken", vm="kvm")  # kvm_pvm here: the build exits 4
    assert worker.wait(timeout=120) == 4
    state = farm.store.state(job)
    assert state is not None and state["state"] == "queued" and "broken (exit 4)" in state["reason"]
    assert farm.queue.counts()["pending"] == 1  # for a healthy worker
    healthy = farm.start_worker(rootfs, "--max-jobs", "1", worker_id="healthy")
    assert healthy.wait(timeout=120) == 0
    assert farm.status(job)["attempt"] == 2


def test_logs_follow_shows_the_build_while_it_runs(farm: Farm, rootfs: Path, tmp_path: Path) -> None:
    job = farm.submit(slow_recipe(tmp_path / "src", 8))
    farm.start_worker(rootfs, "--max-jobs", "1")
    follower = subprocess.Popen(
        [*CLI, "logs", "--store", farm.store_url, "--follow", job],
        env=farm.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert follower.stdout is not None
    for line in follower.stdout:
        if "tick 1" in line:
            break
    state = farm.store.state(job)
    assert (
        farm.store.status(job) is None and state is not None and state["state"] == "running"
    )  # live, not after
    rest = follower.stdout.read()
    assert follower.wait(timeout=60) == 0  # ends when the job ends
    assert "tick 8" in rest
    assert farm.store.status(job) is not None


def test_lease_renewal_keeps_a_build_longer_than_its_lease(farm: Farm, rootfs: Path, tmp_path: Path) -> None:
    job = farm.submit(slow_recipe(tmp_path / "src", 8))
    first = farm.start_worker(rootfs, "--lease", "2", "--max-jobs", "1", worker_id="w1")
    farm.wait_state(job, "running")
    rival = farm.start_worker(rootfs, "--lease", "2", "--idle-exit", "12", worker_id="w2")  # polls all along
    assert first.wait(timeout=120) == 0
    assert rival.wait(timeout=120) == 0
    status = farm.status(job)
    assert (status["attempt"], status["worker"]) == (1, "w1")  # never reclaimed meanwhile
    assert '"job claimed"' not in farm.worker_log("w2")


def test_two_workers_finishing_the_same_job_leave_one_result(
    farm: Farm, rootfs: Path, tmp_path: Path
) -> None:
    job = farm.submit(slow_recipe(tmp_path / "src", 3))
    first = farm.start_worker(rootfs, "--lease", "2", "--max-jobs", "1", worker_id="w1")
    farm.wait_state(job, "running")
    first.send_signal(signal.SIGSTOP)  # its build runs on (own session); its lease runs out
    try:
        second = farm.start_worker(rootfs, "--lease", "2", "--max-jobs", "1", worker_id="w2")
        assert second.wait(timeout=120) == 0, farm.worker_log("w2")[-3000:]
    finally:
        first.send_signal(signal.SIGCONT)  # w1 finds its build done and publishes too: too late
    assert first.wait(timeout=120) == 0, farm.worker_log("w1")[-3000:]
    status = farm.status(job)
    assert (status["attempt"], status["worker"]) == (2, "w2")
    assert "another delivery of this job published first" in farm.worker_log("w1")
    assert len(list((tmp_path / "store" / "jobs" / job / "attempts").iterdir())) == 1
    assert farm.queue.counts() == {"pending": 0, "claimed": 0, "done": 1, "dead": 0}
    dest = tmp_path / "res"
    assert farm.cli("results", "--store", farm.store_url, job, "--dest", str(dest)).returncode == 0
    assert (dest / "result.txt").read_text() == "done"


def test_a_worker_killed_outright_takes_its_builds_down(farm: Farm, rootfs: Path, tmp_path: Path) -> None:
    job = farm.submit(slow_recipe(tmp_path / "src", 600))
    worker = farm.start_worker(rootfs, "--lease", "3600")
    farm.wait_state(job, "running")
    slot = tmp_path / "work-w1" / "slots" / "0"
    assert processes_mentioning(str(slot)) != []
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    # PR_SET_PDEATHSIG: the build gets SIGTERM, stops its chroot and cleans up like `cloudbuild kill`
    wait_for(
        lambda: processes_mentioning(str(slot)) == [],
        what="the orphaned build to stop",
        timeout=60,
        interval=0.2,
    )
    assert mounts_under(slot) == []
