"""examples/deb through the worker: dpkg-buildpackage in a debootstrapped build root (needs the
Debian archive, as CI has), results = the .deb, which installs and runs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.vm import localbuild
from tests.vm.localbuild import CLI, REPO
from tests.worker.workerlib import Farm, farm

pytestmark = [pytest.mark.vm, pytest.mark.slow]
cache = localbuild.cache
__all__ = ["farm"]


@pytest.fixture(scope="module")
def debian_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("debroot") / "root"
    proc = subprocess.run(
        [*CLI, "rootfs", "--debootstrap", "bookworm", "--include", "build-essential", str(target)],
        capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


def test_the_example_debian_package_builds_through_the_worker(
    farm: Farm, debian_root: Path, tmp_path: Path
) -> None:
    job = farm.submit(REPO / "examples" / "deb" / "build.sh")
    worker = farm.start_worker(debian_root, "--max-jobs", "1")
    assert worker.wait(timeout=900) == 0, farm.worker_log()[-3000:]
    dest = tmp_path / "debs"
    fetched = farm.cli("results", "--store", farm.store_url, job, "--dest", str(dest))
    assert fetched.returncode == 0, (
        fetched.stdout,
        fetched.stderr,
        farm.cli("logs", "--store", farm.store_url, job).stdout[-3000:],
    )
    debs = sorted(p.name for p in dest.iterdir())
    assert debs == ["hello-cloudbuild_1.0_amd64.deb"]
    info = subprocess.run(
        ["dpkg-deb", "--field", str(dest / debs[0]), "Package", "Version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert info.stdout.split() == ["Package:", "hello-cloudbuild", "Version:", "1.0"]
    unpacked = tmp_path / "unpacked"
    subprocess.run(["dpkg-deb", "-x", str(dest / debs[0]), str(unpacked)], check=True)
    ran = subprocess.run(
        [unpacked / "usr" / "bin" / "hello-cloudbuild"], capture_output=True, text=True, check=True
    )
    assert ran.stdout == "hello from a package cloudbuild built\n"
    assert "dpkg-buildpackage" in Path(f"{dest}.log").read_text(errors="replace")
