"""Emulator backend: obs-build's --emulator-script protocol against a fake emulator, whole flow.

With swap (verify-options.sh keeps VM_SWAP) the results come through the swap channel; without,
the host reads the guest-written ext4 image with debugfs (never mounting it) and the ordinary
extraction copies the results.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloudbuild.backend import BuildSlot, create_backend
from cloudbuild.build import PhaseLimits
from cloudbuild.commands.kill import kill_slot
from cloudbuild.errors import ExitCode, UsageError
from cloudbuild.options import parse
from local_backends.machines.emulator import EmulatorBackend, script_path
from tests.fakes import emulator as fake_emulator
from tests.fakes import guestplay
from tests.vm import localbuild
from tests.vm.localbuild import REPO, flow, loop_devices_on, recipe, tree

rootfs = localbuild.rootfs  # the fixture

PAYLOAD = {"repeat": "emulated-", "size": 150_003}
GUEST = {
    "status": 0,
    "files": {"results/RPMS/a.rpm": PAYLOAD, "results/empty": "", "_statistics": "MAX_mb_used_memory: 9\n"},
    "symlinks": {"results/latest": "RPMS/a.rpm", "results/evil": "/etc/shadow", "results/up": "../../x"},
    "modes": {"results/RPMS/a.rpm": 0o750, "results/RPMS": 0o700},
}
EXPECTED = {
    "RPMS": "d",
    "RPMS/a.rpm": hashlib.sha256(guestplay.content(PAYLOAD)).hexdigest(),
    "empty": hashlib.sha256(b"").hexdigest(),
    "latest": "l:RPMS/a.rpm",
}


@dataclass
class EmuEnv:
    tmp: Path
    folder: Path
    state_path: Path

    def state(self) -> dict[str, Any]:
        return fake_emulator.load(self.state_path)

    def guest(self, spec: dict[str, Any]) -> None:
        state = self.state()
        state["guest"] = spec
        fake_emulator.save(self.state_path, state)

    def offer_swap(self, device: str = "/dev/sdb") -> None:
        (self.folder / "verify-options.sh").write_text(f"VM_SWAPDEV={device}\n")

    def options(self, root_dir: Path, *extra: str) -> Any:
        return parse(
            [
                "--vm-type",
                "emulator",
                "--rootfs",
                str(root_dir),
                "--vm-disk-size",
                "64",
                "--vm-swap-size",
                "16",
                *extra,
            ]
        )


@pytest.fixture
def emu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmuEnv]:
    build_dir = tmp_path / "build"
    folder = build_dir / "emulator"
    state_path = tmp_path / "emu.json"
    fake_emulator.save(state_path, {"guest": GUEST, "calls": []})
    fake_emulator.install(folder / "emulator.sh", state_path, REPO)
    monkeypatch.setenv("BUILD_DIR", str(build_dir))
    monkeypatch.setenv(fake_emulator.STATE_ENV, str(state_path))
    yield EmuEnv(tmp_path, folder, state_path)
    assert loop_devices_on(tmp_path) == []


def test_script_names_resolve_as_obs_build_does(emu: EmuEnv) -> None:
    assert script_path(parse(["--vm-type", "emulator"])) == emu.folder / "emulator.sh"
    assert (
        script_path(parse(["--vm-type", "emulator", "--emulator-script", "aranym.sh"]))
        == emu.folder / "aranym.sh"
    )
    assert script_path(parse(["--vm-type", "emulator", "--emulator-script", "/opt/e.sh"])) == Path(
        "/opt/e.sh"
    )
    with pytest.raises(UsageError, match="relative names are in"):
        create_backend(parse(["--vm-type", "emulator", "--emulator-script", "missing.sh"])).verify()


def test_with_swap_the_results_come_through_the_swap_channel(emu: EmuEnv, rootfs: Path) -> None:
    emu.offer_swap("/dev/sdb")
    script = recipe(emu.tmp / "src", "true\n")
    options = emu.options(rootfs)
    outcome, console = flow(create_backend(options), options, emu.tmp, script)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert tree(emu.tmp / "out") == EXPECTED
    # modes travel on this path too (debugfs listing -> %modes trailer)
    assert (emu.tmp / "out" / "RPMS" / "a.rpm").stat().st_mode & 0o7777 == 0o750
    assert (emu.tmp / "out" / "RPMS").stat().st_mode & 0o7777 == 0o700
    assert (emu.tmp / "out.statistics").read_text() == "MAX_mb_used_memory: 9\n"
    (call,) = emu.state()["calls"]
    work = emu.tmp / "work"
    assert call == {"argv": [str(work / "root.img"), str(work / "swap.img")], "cwd": str(emu.folder)}
    assert "VM_SWAP='/dev/sdb'" in emu.state()["guest_seen"]["build_data"]
    assert b"emulated build finished" in console.data


def test_without_swap_the_image_is_read_in_userspace(
    emu: EmuEnv, rootfs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = recipe(emu.tmp / "src", "true\n")
    options = emu.options(rootfs, "--emulator-script", "emulator.sh")
    mounts: list[list[str]] = []
    from cloudbuild.disk import mount as disk_mount

    real_run = disk_mount.run

    def watch(argv: Any, *args: Any, **kwargs: Any) -> Any:
        if argv[:1] == ["mount"]:
            mounts.append([str(a) for a in argv])
        return real_run(argv, *args, **kwargs)

    monkeypatch.setattr(disk_mount, "run", watch)
    outcome, _ = flow(create_backend(options), options, emu.tmp, script)
    monkeypatch.undo()
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert tree(emu.tmp / "out") == EXPECTED
    # modes travel on this path too (debugfs listing -> %modes trailer)
    assert (emu.tmp / "out" / "RPMS" / "a.rpm").stat().st_mode & 0o7777 == 0o750
    assert (emu.tmp / "out" / "RPMS").stat().st_mode & 0o7777 == 0o700
    assert (emu.tmp / "out.statistics").read_text() == "MAX_mb_used_memory: 9\n"
    (call,) = emu.state()["calls"]
    assert call["argv"] == [str(emu.tmp / "work" / "root.img"), ""]  # obs-build passes an empty swap
    assert "VM_SWAP" not in emu.state()["guest_seen"]["build_data"]
    # the host mounted the root only to stage it, before the guest wrote it: never after
    assert len(mounts) == 1 and "loop" in " ".join(mounts[0])


def test_without_swap_a_failed_build_extracts_nothing(emu: EmuEnv, rootfs: Path) -> None:
    emu.guest({**GUEST, "status": 1})
    options = emu.options(rootfs)
    outcome, _ = flow(create_backend(options), options, emu.tmp, recipe(emu.tmp / "src", "true\n"))
    assert outcome.exit_code == ExitCode.BUILD_FAILED
    assert not (emu.tmp / "out").exists()
    assert (emu.tmp / "out.statistics").read_text() == "MAX_mb_used_memory: 9\n"  # on failure too


def test_without_swap_no_exit_file_is_an_infrastructure_failure(emu: EmuEnv, rootfs: Path) -> None:
    emu.guest({**GUEST, "no_exit_file": True})
    options = emu.options(rootfs)
    outcome, _ = flow(create_backend(options), options, emu.tmp, recipe(emu.tmp / "src", "true\n"))
    assert outcome.exit_code == ExitCode.INFRA
    assert "no build status" in outcome.message


def test_an_emulator_that_fails_is_exit_3(emu: EmuEnv, rootfs: Path) -> None:
    emu.guest({"exit": 4})
    options = emu.options(rootfs)
    outcome, _ = flow(create_backend(options), options, emu.tmp, recipe(emu.tmp / "src", "true\n"))
    assert outcome.exit_code == ExitCode.INFRA
    assert "exited 4" in outcome.message


def test_without_swap_only_ext_filesystems(emu: EmuEnv, rootfs: Path) -> None:
    with pytest.raises(UsageError, match="debugfs"):
        create_backend(emu.options(rootfs, "--vm-disk-filesystem", "xfs")).verify()
    emu.offer_swap()
    create_backend(emu.options(rootfs, "--vm-disk-filesystem", "xfs")).verify()


def test_cloudbuild_kill_marks_the_swap_and_kills_the_emulator(emu: EmuEnv, rootfs: Path) -> None:
    emu.offer_swap()
    emu.guest({"hang": True})
    options = emu.options(rootfs)
    result: dict[str, Any] = {}
    script = recipe(emu.tmp / "src", "true\n")
    runner = threading.Thread(
        target=lambda: result.update(out=flow(create_backend(options), options, emu.tmp, script))
    )
    runner.start()
    from cloudbuild.retry import wait_for

    wait_for(lambda: emu.state()["calls"] or None, what="the emulator to start", timeout=60, interval=0.05)
    backend = create_backend(options)
    assert isinstance(backend, EmulatorBackend)
    kill_slot(backend, BuildSlot("t1", 0, emu.tmp / "work"))
    runner.join(timeout=60)
    outcome, _ = result["out"]
    assert outcome.exit_code == ExitCode.BUILD_FAILED, outcome.message
    assert not (emu.tmp / "out").exists()
    assert not (emu.tmp / "work" / "swap.img").exists()  # cleaned up


def test_cloudbuild_build_command_runs_the_emulator(emu: EmuEnv, rootfs: Path) -> None:
    from tests.vm.localbuild import cli_build

    script = recipe(emu.tmp / "src", "true\n")
    proc = cli_build(
        emu.tmp, emu.tmp / "cache", "emulator", rootfs, script,
        "--emulator-script", "emulator.sh", "--vm-disk-size", "64",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree(emu.tmp / "out") == EXPECTED


def test_the_emulator_boots_the_roots_init_which_is_the_agent(emu: EmuEnv, rootfs: Path) -> None:
    """obs-build's emulator fixup (/sbin/init -> its 2nd stage) with our agent as that init: the
    fake emulator boots the image's own /sbin/init, the agent runs the recipe and powers off."""
    emu.guest({"boot": True})
    script = recipe(emu.tmp / "src", 'echo emulated > "$BUILD_RESULTS/out.txt"\nuname -n\n')
    options = emu.options(rootfs, "--vm-disk-size", "128")
    # a root whose init is not the agent (busybox's) would run forever: the limit ends it as exit 3
    limits = PhaseLimits(boot=120)
    outcome, console = flow(create_backend(options), options, emu.tmp, script, limits=limits)
    assert outcome.exit_code == ExitCode.OK, outcome.message + console.data.decode(errors="replace")[-3000:]
    assert tree(emu.tmp / "out") == {"out.txt": hashlib.sha256(b"emulated\n").hexdigest()}
    assert "TIME_main_build: " in (emu.tmp / "out.statistics").read_text()
