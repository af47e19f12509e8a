"""The job commands' bad input: one line naming the option or field, exit 1, nothing queued."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.vm.localbuild import CLI


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--allow", "vm-volumes"], "--allow vm-volumes: jobs may never set 'vm-volumes'"),
        (["--allow", "vm-memory=lots"], "--allow vm-memory=lots: --vm-memory: 'lots' is not a positive size"),
        (["--dest", "/tmp/x"], "--dest is set per job and slot by the worker; drop it"),
        (["--root", "/tmp/x"], "--root is set per job and slot by the worker"),
        (["recipe.sh"], "unexpected argument 'recipe.sh' (recipes come from the queue)"),
        (["--slots", "0"], "--slots: '0' is not a positive number"),
        (["--bogus"], "unknown option '--bogus'"),
    ],
)
def test_worker_refuses_bad_options(tmp_path: Path, extra: list[str], message: str) -> None:
    proc = cli("worker", "--queue", f"dir://{tmp_path}/q", "--store", f"dir://{tmp_path}/s",
               "--vm-type", "chroot", "--rootfs", str(tmp_path), *extra)  # fmt: skip
    assert proc.returncode == 1
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_unknown_queue_kinds_and_relative_dir_urls_are_refused(tmp_path: Path) -> None:
    proc = cli("status", "--store", "s3://bucket/prefix", "j")
    assert (
        proc.returncode == 1
        and "--store s3://bucket/prefix: unknown kind 's3://' (supported: dir://)" in proc.stderr
    )
    proc = cli("status", "--store", "dir://relative/path", "j")
    assert proc.returncode == 1 and "a dir:// URL names an absolute folder" in proc.stderr


def test_status_and_results_of_an_unknown_job(tmp_path: Path) -> None:
    proc = cli("status", "--store", f"dir://{tmp_path}", "nope")
    assert proc.returncode == 1 and "job nope: unknown to the store" in proc.stderr
    proc = cli("results", "--store", f"dir://{tmp_path}", "nope", "--dest", str(tmp_path / "out"))
    assert proc.returncode == 1 and "job nope has no result yet" in proc.stderr


def test_submit_refuses_a_bad_job_document_before_queueing(tmp_path: Path) -> None:
    doc = tmp_path / "job.json"
    doc.write_text('{"version": 1, "id": "j", "recipe": "sha256-' + "0" * 64 + '", "options": {"jobs": [1]}}')
    proc = cli("submit", "--queue", f"dir://{tmp_path}/q", "--store", f"dir://{tmp_path}/s", str(doc))
    assert proc.returncode == 1 and "job field 'options.jobs'" in proc.stderr
    doc.write_text('{"version": 1, "id": "j", "recipe": "sha256-' + "0" * 64 + '"}')
    proc = cli("submit", "--queue", f"dir://{tmp_path}/q", "--store", f"dir://{tmp_path}/s", str(doc))
    assert proc.returncode == 1 and "field 'recipe'" in proc.stderr and "is not in the store" in proc.stderr
    assert not (tmp_path / "q" / "pending").exists() or list((tmp_path / "q" / "pending").iterdir()) == []
