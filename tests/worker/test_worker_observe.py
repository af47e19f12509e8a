"""Metrics (Prometheus text from prometheus_client), the health endpoint, and a store that goes
away mid-job: the worker waits it out with backoff and loses nothing."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cloudbuild.worker import observe
from cloudbuild.worker.observe import Health
from tests.vm import localbuild
from tests.worker.workerlib import Farm, farm, slow_recipe

pytestmark = [pytest.mark.vm, pytest.mark.slow]
rootfs = localbuild.rootfs
cache = localbuild.cache
__all__ = ["farm"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_and_health_of_a_working_worker(farm: Farm, rootfs: Path, tmp_path: Path) -> None:
    metrics_port, health_port = free_port(), free_port()
    job = farm.submit(slow_recipe(tmp_path / "src", 4))
    farm.start_worker(
        rootfs, "--metrics-port", str(metrics_port), "--health-port", str(health_port), "--lease", "3"
    )
    farm.wait_state(job, "running")
    assert get(f"http://127.0.0.1:{health_port}/health") == (200, "ok\n")
    busy = get(f"http://127.0.0.1:{metrics_port}/metrics")[1]
    assert "cloudbuild_worker_busy_slots 1.0" in busy
    farm.wait_state(job, "done")
    from cloudbuild.retry import wait_for

    def scraped() -> str | None:
        text = get(f"http://127.0.0.1:{metrics_port}/metrics")[1]
        return text if 'cloudbuild_worker_jobs_total{outcome="ok"} 1.0' in text else None

    text = wait_for(scraped, what="the job counted", timeout=30, interval=0.2)
    assert "cloudbuild_worker_busy_slots 0.0" in text
    assert 'cloudbuild_worker_phase_seconds_count{phase="build"} 1.0' in text
    assert 'cloudbuild_worker_lease_renewals_total{result="ok"}' in text
    assert "cloudbuild_worker_queue_wait_seconds_count 1.0" in text


def test_health_fails_after_exit_4_and_after_a_long_unreachable_store(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    health = Health()
    server = health.serve(0)
    url = f"http://127.0.0.1:{server.server_address[1]}/health"
    try:
        assert get(url) == (200, "ok\n")
        health.reached(False)
        assert get(url)[0] == 200  # a blip is not a broken host
        monkeypatch.setattr(observe, "UNREACHABLE_LIMIT", 0.0)
        status, body = get(url)
        assert status == 503 and "unreachable" in body
        health.reached(True)
        assert get(url)[0] == 200
        health.host_broken("build of j exited 4")
        assert get(url) == (503, "host broken: build of j exited 4\n")
    finally:
        server.shutdown()


def test_a_store_unreachable_mid_job_is_waited_out_and_nothing_is_lost(
    farm: Farm, rootfs: Path, tmp_path: Path
) -> None:
    job = farm.submit(slow_recipe(tmp_path / "src", 4))
    worker = farm.start_worker(rootfs, "--max-jobs", "1")
    farm.wait_state(job, "running")
    store, away = tmp_path / "store", tmp_path / "store-unmounted"
    store.rename(away)  # the store's file system is gone while the build runs and finishes
    from cloudbuild.retry import wait_for

    wait_for(lambda: '"retrying"' in farm.worker_log(), what="the worker to retry", timeout=60, interval=0.2)
    away.rename(store)
    assert worker.wait(timeout=120) == 0, farm.worker_log()[-3000:]
    status = farm.status(job)
    assert (status["state"], status["exit_code"], status["attempt"]) == ("done", 0, 1)
    assert farm.queue.counts() == {"pending": 0, "claimed": 0, "done": 1, "dead": 0}
