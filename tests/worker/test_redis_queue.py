"""redis:// against a real redis-server (Debian's, started here on 127.0.0.1): the consumer group,
lease renewal and reclaim, delivery counts, release, dead letter, sweep, an unreachable server;
and the worker end to end with it (chroot, dir:// store)."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cloudbuild.retry import wait_for
from cloudbuild.runner import which
from cloudbuild.worker.protocols import LeaseLost, Unreachable
from cloudbuild.worker.redisqueue import RedisQueue
from cloudbuild.worker.urls import open_queue
from tests.vm import localbuild
from tests.worker.workerlib import Farm, slow_recipe

rootfs = localbuild.rootfs
cache = localbuild.cache


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(name="redis_url")
def redis_url_fixture(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    server = subprocess.Popen(
        [which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port)
    wait_for(lambda: _pings(client), what="redis-server", timeout=30, interval=0.05)
    try:
        yield f"redis://127.0.0.1:{port}/jobs"
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()


def _pings(client: redis.Redis) -> bool | None:
    try:
        return bool(client.ping()) or None
    except redis.ConnectionError:
        return None


def _queue(url: str) -> RedisQueue:
    queue = open_queue(url)
    assert isinstance(queue, RedisQueue)
    return queue


def test_claim_renew_release_ack_with_delivery_counts(redis_url: str) -> None:
    queue = _queue(redis_url)
    queue.put("job-1", b'{"id": "job-1"}')
    first = queue.claim("w1", lease=60)
    assert first is not None and (first.message_id, first.attempt, first.body) == ("job-1", 1, b'{"id": "job-1"}')
    assert queue.claim("w2", lease=60) is None
    queue.renew(first, lease=60)  # JUSTID: no delivery counted
    queue.release(first)
    second = queue.claim("w2", lease=60)
    assert second is not None and second.attempt == 2
    queue.ack(second)
    assert queue.claim("w1", lease=60) is None
    assert queue.redis.xlen("jobs") == 0


def test_an_expired_lease_is_reclaimed_and_the_old_holder_cannot_renew(redis_url: str) -> None:
    queue = _queue(redis_url)
    queue.put("job-1", b"{}")
    first = queue.claim("w1", lease=0.2)
    assert first is not None
    second = wait_for(lambda: queue.claim("w2", lease=0.2), what="the reclaim", timeout=30, interval=0.1)
    assert second.attempt == 2 and second.message_id == "job-1"
    with pytest.raises(LeaseLost):
        queue.renew(first, lease=60)  # never steals it back
    queue.renew(second, lease=60)


def test_dead_letter_parks_it_in_the_dead_stream_and_sweep_releases_a_dead_run(redis_url: str) -> None:
    queue = _queue(redis_url)
    queue.put("poison", b"{}")
    claim = queue.claim("w1", lease=60)
    assert claim is not None
    queue.dead_letter(claim)
    assert queue.claim("w1", lease=60) is None
    assert [f[b"id"] for _, f in queue.redis.xrange("jobs:dead")] == [b"poison"]
    queue.put("job-2", b"{}")
    assert queue.claim("w1", lease=600) is not None  # then w1 dies; its restart sweeps
    assert queue.sweep("w1") == ["job-2"]
    again = queue.claim("w2", lease=600)
    assert again is not None and (again.message_id, again.attempt) == ("job-2", 2)


def test_an_unreachable_server_is_unreachable(redis_url: str) -> None:
    queue = _queue(redis_url)
    queue.redis = redis.Redis(port=_free_port(), socket_connect_timeout=1)
    with pytest.raises(Unreachable):
        queue.claim("w1", lease=60)


@pytest.mark.vm
@pytest.mark.slow
def test_worker_sigkilled_mid_build_another_reclaims_over_redis(
    redis_url: str, rootfs: Path, cache: Path, tmp_path: Path
) -> None:
    farm = RedisFarm(tmp_path, cache)
    farm.redis = redis_url
    try:
        job_id = farm.submit(slow_recipe(tmp_path / "slow", 4))
        first = farm.start_worker(rootfs, "--lease", "3")
        farm.wait_state(job_id, "running")
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = farm.start_worker(rootfs, "--lease", "3", "--max-jobs", "1", worker_id="w2")
        assert second.wait(timeout=300) == 0, farm.worker_log("w2")[-3000:]
        status = farm.status(job_id)
        assert (status["state"], status["attempt"]) == ("done", 2)
        queue = _queue(redis_url)
        assert queue.redis.xlen("jobs") == 0 and queue.redis.xpending("jobs", "cloudbuild")["pending"] == 0
    finally:
        farm.stop_all()


class RedisFarm(Farm):
    redis = ""

    @property
    def queue_url(self) -> str:
        return self.redis
