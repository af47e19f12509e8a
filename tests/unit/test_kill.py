"""`cloudbuild kill`: finds the build's work folder, marks the swap BUILDSTATUS1, stops the machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudbuild.backend import (
    KILL_MARKER,
    Backend,
    BootResult,
    BuildSlot,
    Console,
    clear_killed,
    mark_killed,
    was_killed,
)
from cloudbuild.commands import kill
from cloudbuild.disk import buildstatus
from cloudbuild.errors import UsageError
from cloudbuild.options import parse
from cloudbuild.volume import Role, VolumePair
from local_backends.localvolume import LocalVolume
from local_backends.machines import vmproc


class RecordingBackend(Backend):
    name = "recording"

    def __init__(self, swap: Path | None, events: list[str]):
        super().__init__(parse([]))
        self.swap = swap
        self.events = events

    def verify(self) -> None:
        self.events.append("verify")

    def volumes(self, slot: BuildSlot) -> VolumePair:
        root = LocalVolume(Role.ROOT, slot.workdir / "root.img", 1)
        return VolumePair(root, LocalVolume(Role.SWAP, self.swap, 1) if self.swap else None)

    def boot_and_wait(
        self, pair: VolumePair, slot: BuildSlot, *, timeout: float | None, console: Console
    ) -> BootResult:
        raise AssertionError("kill never boots")

    def kill(self) -> None:
        status = buildstatus.read(self.swap) if self.swap else None
        self.events.append(f"kill (swap status then: {status})")
        if self.swap:
            buildstatus.write(self.swap, 0)  # the guest finished just now and wrote its own status


def test_the_swap_is_marked_before_and_after_the_machine_is_stopped(tmp_path: Path) -> None:
    swap = tmp_path / "swap.img"
    swap.write_bytes(b"\0" * 4096)
    events: list[str] = []
    kill.kill_slot(RecordingBackend(swap, events), BuildSlot("b", 0, tmp_path))
    assert events == ["kill (swap status then: 1)"]
    assert buildstatus.read(swap) == 1  # marked again after the guest's late BUILDSTATUS0
    assert (tmp_path / KILL_MARKER).exists()


def test_backends_without_swap_get_the_marker_only(tmp_path: Path) -> None:
    events: list[str] = []
    kill.kill_slot(RecordingBackend(None, events), BuildSlot("b", 0, tmp_path))
    assert events == ["kill (swap status then: None)"]
    assert was_killed(tmp_path)


def test_work_folders_are_found_as_cloudbuild_build_lays_them_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    (tmp_path / "cloudbuild-abc-x1y2").mkdir()
    (tmp_path / "cloudbuild-abcd-zzzz").mkdir()
    assert kill.work_folders(parse([]), "abc") == [tmp_path / "cloudbuild-abc-x1y2"]
    assert kill.work_folders(parse(["--root", "/var/tmp/br"]), "abc") == [Path("/var/tmp/br")]
    assert kill.work_folders(parse([]), "nothing") == []


def test_nothing_running_is_exit_0(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert kill.main(["--vm-type", "uml", "--build-id", "gone", "--log-format", "json"]) == 0
    assert "no build gone is running" in capsys.readouterr().err


def test_a_build_id_is_required() -> None:
    with pytest.raises(UsageError, match="--build-id"):
        kill.main(["--vm-type", "uml", "--log-format", "json"])


def test_kill_through_the_cli_marks_a_uml_swap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    work = tmp_path / "cloudbuild-b7-abcd"
    work.mkdir()
    (work / "root.img").write_bytes(b"\0" * 4096)
    (work / "swap.img").write_bytes(b"BUILDSTATUS0" + b"\0" * 4084)
    assert kill.main(["--vm-type", "uml", "--build-id", "b7", "--log-format", "json"]) == 0
    assert buildstatus.read(work / "swap.img") == 1
    assert kill.main(["--vm-type", "uml", "--build-id", "b7", "--log-format", "json"]) == 0  # idempotent


@pytest.mark.parametrize("vm_type", ["none", "lxc"])
def test_directory_backends_order_the_verdicts_as_the_machines_do(tmp_path: Path, vm_type: str) -> None:
    """A build that hit its timeout and was also killed is TIMEOUT for chroot and lxc as for qemu
    (vmproc.machine_outcome decides for all); a kill alone reports the build failed (status 1)."""
    from cloudbuild.backend import ExitReason, create_backend
    from cloudbuild.watchdog import Watchdog
    from local_backends.machines.directory import DirectoryBackend

    backend = create_backend(parse(["--vm-type", vm_type]))
    assert isinstance(backend, DirectoryBackend)
    backend.volumes(BuildSlot("b", 0, tmp_path))
    dog = Watchdog(lambda data: None, timeout=None, on_fire=lambda: None)  # type: ignore[arg-type]
    mark_killed(tmp_path)
    outcome = backend.outcome
    assert outcome(vmproc.ProcessExit(None, timed_out=True), dog).reason is ExitReason.TIMEOUT
    killed = outcome(vmproc.ProcessExit(137), dog)
    assert (killed.reason, killed.status) == (ExitReason.KILLED, 1)
    dog.fired = True
    assert outcome(vmproc.ProcessExit(None, timed_out=True), dog).reason is ExitReason.WATCHDOG
    clear_killed(tmp_path)
    dog.fired = False
    assert outcome(vmproc.ProcessExit(0), dog).status == 255  # no status recorded: exit 3
