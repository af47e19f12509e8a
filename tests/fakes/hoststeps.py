"""The one file-based fake of the host steps (`cloudbuild.build.HostSteps`) for cloud tests: no
filesystems, only marks on the volume images. (`tests/fakes/memory.py` has the ledger-based one
of the orchestrator tests, over volumes that are not files.)"""

from __future__ import annotations

from pathlib import Path

from cloudbuild.backend import Backend
from cloudbuild.deadline import Deadline
from cloudbuild.disk import buildstatus
from cloudbuild.disk.image import zero_head


class FakeHostSteps:
    """Mark the root as staged, clear and read the status, copy the root's head and the result out."""

    STAGED = b"ROOT-STAGED\n"
    RESULT_OFFSET = 4096

    def __init__(self) -> None:
        self.calls: list[str] = []

    def prepare_root(self, device: Path, backend: Backend, deadline: Deadline) -> None:
        self.calls.append("prepare_root")
        with open(device, "r+b") as f:
            f.write(self.STAGED)
        backend.fixup(device)  # as DiskHostSteps does once the root is staged

    def reset_swap(self, device: Path, deadline: Deadline) -> None:
        self.calls.append("reset_swap")
        zero_head(device)

    def read_status(self, device: Path) -> int | None:
        self.calls.append("read_status")
        return buildstatus.read(device)

    def extract_statistics(self, root: Path, swap: Path | None, dest: Path, deadline: Deadline) -> None:
        self.calls.append("extract_statistics")  # the emulated guests write no statistics

    def extract(self, root: Path, swap: Path | None, dest: Path, deadline: Deadline) -> None:
        self.calls.append("extract")
        dest.mkdir(parents=True, exist_ok=True)
        with open(root, "rb") as f:
            (dest / "root-head").write_bytes(f.read(4))
            f.seek(self.RESULT_OFFSET)
            (dest / "result").write_bytes(f.read(64).rstrip(b"\0"))
