"""The worker end to end with the real qemu backend (TCG): three jobs, two slots at once, each in
its own slot folder and VM, results byte-exact (and executable bits kept) through `cloudbuild results`."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.vm import localbuild
from tests.vm.localbuild import recipe, sha, tree
from tests.vm.test_qemu_build import qemu_processes
from tests.worker.workerlib import Farm, farm

pytestmark = [pytest.mark.vm, pytest.mark.slow]
rootfs = localbuild.rootfs
cache = localbuild.cache
__all__ = ["farm"]


def test_three_qemu_jobs_on_two_slots_results_byte_exact(farm: Farm, rootfs: Path, tmp_path: Path) -> None:
    payloads: dict[str, bytes] = {}
    for n in range(3):
        src = tmp_path / f"src{n}"
        src.mkdir()
        data = os.urandom(1024 * 1024 + n)
        (src / "input.bin").write_bytes(data)
        script = recipe(
            src,
            "mkdir -p $BUILD_RESULTS/pkg\ncp input.bin $BUILD_RESULTS/pkg/input.bin\n"
            'printf "#!/bin/sh\\necho tool\\n" > $BUILD_RESULTS/pkg/tool\nchmod 755 $BUILD_RESULTS/pkg/tool\n'
            "echo recipe ran in the vm\n",
        )
        payloads[farm.submit(script, "--option", "vm-memory=384")] = data
    worker = farm.start_worker(
        rootfs, "--slots", "2", "--max-jobs", "3", "--allow", "vm-memory=512",
        "--vm-disk-size", "512", "--vm-swap-size", "64", vm="qemu",
    )  # fmt: skip
    assert worker.wait(timeout=900) == 0, farm.worker_log()[-3000:]
    for job_id, data in payloads.items():
        dest = tmp_path / f"res-{job_id}"
        fetched = farm.cli("results", "--store", farm.store_url, job_id, "--dest", str(dest))
        assert fetched.returncode == 0, fetched.stderr
        assert fetched.stdout.strip() == f"{job_id}: done (exit 0) attempt 1"
        assert tree(dest) == {
            "pkg": "d",
            "pkg/input.bin": sha(data),
            "pkg/tool": sha(b"#!/bin/sh\necho tool\n"),
        }
        assert stat.S_IMODE((dest / "pkg" / "tool").stat().st_mode) == 0o755
        assert "recipe ran in the vm" in Path(f"{dest}.log").read_text(errors="replace")
    events = [line for line in farm.worker_log().splitlines() if '"build starting"' in line]
    assert {e.split('"slot": ')[1].split(",")[0] for e in events} == {"0", "1"}
    assert qemu_processes(str(tmp_path)) == []
