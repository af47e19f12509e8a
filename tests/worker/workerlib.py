"""Helpers of the worker tests: real `cloudbuild` processes over a dir:// queue and store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cloudbuild.retry import wait_for
from cloudbuild.worker.dirqueue import DirQueue
from cloudbuild.worker.dirstore import DirStore
from tests.vm.localbuild import CLI, recipe


@dataclass
class Farm:
    """A queue, a store and the worker processes a test started (all killed at its end)."""

    top: Path
    cache: Path
    workers: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def queue_url(self) -> str:
        return f"dir://{self.top / 'queue'}"

    @property
    def store_url(self) -> str:
        return f"dir://{self.top / 'store'}"

    @property
    def queue(self) -> DirQueue:
        return DirQueue(self.top / "queue")

    @property
    def store(self) -> DirStore:
        return DirStore(self.top / "store")

    def env(self) -> dict[str, str]:
        # off EC2 unless a test says otherwise (tests/worker/fleetlib.py): no IMDS probe at start-up
        return {
            "AWS_EC2_METADATA_DISABLED": "true",
            **os.environ,
            "CLOUDBUILD_CACHE_DIR": str(self.cache),
            "TMPDIR": str(self.top),
        }

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], env=self.env(), capture_output=True, text=True, timeout=timeout)

    def submit(self, script: Path, *args: str) -> str:
        proc = self.cli("submit", "--queue", self.queue_url, "--store", self.store_url, *args, str(script))
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def status(self, job_id: str) -> dict[str, Any]:
        proc = self.cli("status", "--store", self.store_url, "--json", job_id)
        assert proc.returncode == 0, proc.stderr
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    def status_line(self, job_id: str) -> str:
        proc = self.cli("status", "--store", self.store_url, job_id)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    def start_worker(
        self, rootfs: Path, *args: str, worker_id: str = "w1", vm: str = "chroot"
    ) -> subprocess.Popen[str]:
        argv = [
            *CLI, "worker", "--queue", self.queue_url, "--store", self.store_url, "--worker-id", worker_id,
            "--work-dir", str(self.top / f"work-{worker_id}"), "--log-format", "json",
            "--vm-type", vm, "--rootfs", str(rootfs), *args,
        ]  # fmt: skip
        with open(self.top / f"worker-{worker_id}.log", "a") as log:
            proc = subprocess.Popen(argv, env=self.env(), stdout=log, stderr=subprocess.STDOUT, text=True)
        self.workers.append(proc)
        return proc

    def worker_log(self, worker_id: str = "w1") -> str:
        return (self.top / f"worker-{worker_id}.log").read_text()

    def wait_state(self, job_id: str, state: str, timeout: float = 120) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status = self.store.status(job_id) or self.store.state(job_id) or {}
            return status if status.get("state") == state else None

        return wait_for(probe, what=f"job {job_id} {state}", timeout=timeout, interval=0.1, max_interval=0.5)

    def stop_all(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


@pytest.fixture
def farm(tmp_path: Path, cache: Path) -> Iterator[Farm]:
    f = Farm(tmp_path, cache)
    yield f
    f.stop_all()


def slow_recipe(folder: Path, seconds: int, *, result: str = "done") -> Path:
    """A recipe that logs a line a second for `seconds`, then leaves one result file."""
    return recipe(
        folder,
        f"for i in $(seq 1 {seconds}); do echo tick $i; sleep 1; done\n"
        f"echo -n {result} > $BUILD_RESULTS/result.txt\n",
    )
