"""z/VM backend against stateful fakes of vmcp, dasd_configure, lsdasd, iucvconn and zipl."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloudbuild.backend import BuildSlot, ExitReason, create_backend
from cloudbuild.commands.kill import kill_slot
from cloudbuild.disk import buildstatus
from cloudbuild.errors import ExitCode, InfraError, UsageError
from cloudbuild.options import parse
from cloudbuild.volume import Role, VolumeState
from local_backends.machines import zvm
from local_backends.machines.zvm import ZvmBackend, ZvmMinidisk, bus_id, local_devnr
from tests.fakes import dasd, guestplay, vmcp
from tests.fakes.console import RecordingConsole
from tests.vm import localbuild
from tests.vm.localbuild import flow, recipe, sha, tree

rootfs = localbuild.rootfs  # the fixture

REPO = Path(__file__).resolve().parents[2]
WORKER = "BUILD07"


@dataclass
class ZvmEnv:
    tmp: Path
    state_path: Path
    root_image: Path
    swap_image: Path

    def state(self) -> dict[str, Any]:
        return vmcp.load(self.state_path)

    def update(self, **changes: Any) -> None:
        state = self.state()
        state.update(changes)
        vmcp.save(self.state_path, state)

    def calls(self, tool: str = "vmcp") -> list[list[str]]:
        return [c[1:] for c in self.state()["calls"] if c[0] == tool]

    def options(self, *extra: str) -> list[str]:
        return [
            "--vm-type",
            "zvm",
            "--vm-worker",
            WORKER,
            "--vm-worker-nr",
            "7",
            "--vm-kernel",
            str(self.tmp / "image"),
            "--vm-initrd",
            str(self.tmp / "initrd"),
            *extra,
        ]

    def backend(self, *extra: str) -> ZvmBackend:
        backend = create_backend(parse(self.options(*extra)))
        assert isinstance(backend, ZvmBackend)
        return backend


@pytest.fixture
def zvm_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ZvmEnv]:
    root, swap = tmp_path / "root.img", tmp_path / "swap.img"
    subprocess.run(["truncate", "-s", "64M", root], check=True)
    subprocess.run(["truncate", "-s", "16M", swap], check=True)
    (tmp_path / "image").write_bytes(b"kernel")
    (tmp_path / "initrd").write_bytes(b"initrd")
    sys_root, dev_root = tmp_path / "sys", tmp_path / "dev"
    state_path = tmp_path / "zvm.json"
    vmcp.save(
        state_path, vmcp.new_state(sys_root, dev_root, {WORKER: {"0150": str(root), "0250": str(swap)}})
    )
    vmcp.install(tmp_path / "bin", state_path, REPO)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv(vmcp.STATE_ENV, str(state_path))
    monkeypatch.setattr(ZvmBackend, "sys_root", sys_root)
    monkeypatch.setattr(ZvmBackend, "dev_root", dev_root)
    env = ZvmEnv(tmp_path, state_path, root, swap)
    try:
        yield env
    finally:
        state = env.state()
        leftover = dict(state["online"])
        dasd.cleanup(state)
        vmcp.save(state_path, state)
        assert leftover == {}, "the backend left a DASD online"
        assert "fatal" not in state


def test_local_device_numbers_follow_obs_build() -> None:
    assert local_devnr(Role.ROOT, 0) == "300"
    assert local_devnr(Role.SWAP, 7) == "407"
    assert local_devnr(Role.ROOT, 99) == "399"
    assert bus_id("307") == "0.0.0307"
    with pytest.raises(UsageError, match="0 to 99"):
        local_devnr(Role.ROOT, 100)


def test_the_controllers_root_is_never_detached() -> None:
    with pytest.raises(InfraError, match="own root"):
        zvm.prevent_detach("0150")
    with pytest.raises(InfraError):
        zvm.prevent_detach("150")


def test_verify_names_what_is_missing(zvm_env: ZvmEnv) -> None:
    with pytest.raises(UsageError, match="--vm-worker NAME"):
        create_backend(parse(["--vm-type", "zvm", "--vm-worker-nr", "1"])).verify()
    with pytest.raises(UsageError, match="--vm-worker-nr"):
        create_backend(parse(["--vm-type", "zvm", "--vm-worker", "W1"])).verify()
    with pytest.raises(UsageError, match="--vm-initrd"):
        create_backend(
            parse(["--vm-type", "zvm", "--vm-worker", "W1", "--vm-worker-nr", "1", "--vm-kernel", "/k"])
        ).verify()
    with pytest.raises(UsageError, match="4-digit"):
        zvm_env.backend("--vm-volumes", "150", "250").verify()
    zvm_env.backend().verify()
    assert zvm_env.state()["logged_on"][WORKER] is True  # worker_init ran


def test_worker_init_removes_stale_links_restarts_worker_and_takes_its_disks(zvm_env: ZvmEnv) -> None:
    # a crashed run left the worker running and its root linked and online here
    state = zvm_env.state()
    state["logged_on"][WORKER] = True
    state["local_links"]["307"] = [WORKER, "0150"]
    vmcp.save(zvm_env.state_path, state)
    subprocess.run(["dasd_configure", "0.0.0307", "1", "0"], check=True)
    backend = zvm_env.backend("--vm-memory", "2048")
    backend.verify()
    pair = backend.volumes(BuildSlot("b1", 7, zvm_env.tmp))
    state = zvm_env.state()
    assert state["online"] == {} and state["local_links"] == {}
    assert state["logged_on"][WORKER] is True
    assert state["memory"][WORKER] == "2048M"
    assert state["worker_links"][WORKER] == []
    calls = zvm_env.calls()
    assert calls.index(["detach", "307"]) < calls.index(["force", WORKER]) < calls.index(["xautolog", WORKER])
    assert calls.index(["xautolog", WORKER]) < calls.index(
        ["send", WORKER, "cp", "define", "storage", "2048M"]
    )
    assert calls[-2:] == [["send", WORKER, "cp", "detach", "0150"], ["send", WORKER, "cp", "detach", "0250"]]
    assert ["dasd_configure", "0.0.0307", "0", "0"] in zvm_env.state()["calls"]
    assert [v.state() for v in pair] == [VolumeState.AVAILABLE, VolumeState.AVAILABLE]


def test_attach_here_links_sets_online_and_returns_the_first_partition(zvm_env: ZvmEnv) -> None:
    backend = zvm_env.backend()
    backend.verify()
    pair = backend.volumes(BuildSlot("b1", 7, zvm_env.tmp))
    device = pair.root.attach()
    assert device == zvm_env.tmp / "dev" / "dasdb1"
    assert device.is_block_device()
    assert pair.root.attach() == device  # idempotent
    assert pair.root.state() is VolumeState.ATTACHED
    assert zvm_env.calls().count(["link", WORKER, "0150", "307", "MW"]) == 1
    pair.root.detach()
    pair.root.detach()
    assert zvm_env.state()["local_links"] == {}


def test_a_disk_linked_into_the_worker_is_not_linked_here_behind_its_back(zvm_env: ZvmEnv) -> None:
    backend = zvm_env.backend()
    backend.logon()  # the directory links 0150 and 0250 into the worker at logon
    disk = ZvmMinidisk(Role.ROOT, worker=WORKER, disk="0150", worker_nr=7)
    with pytest.raises(InfraError, match="could not link"):
        disk.attach()
    assert "linked R/W by BUILD07" in zvm_env.state()["errors"][-1]


def test_boot_links_disks_into_the_worker_ipls_and_takes_them_back(zvm_env: ZvmEnv) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", zvm_env.root_image], check=True)
    zvm_env.update(
        guest={"status": 0, "files": {"results/RPMS/a.rpm": "rpm"}, "console": "hello from BUILD07\n"}
    )
    backend = zvm_env.backend()
    slot = BuildSlot("b1", 7, zvm_env.tmp)
    backend.verify()
    pair = backend.volumes(slot)
    console = RecordingConsole()
    result = backend.boot_and_wait(pair, slot, timeout=60, console=console)
    assert result.reason is ExitReason.POWERED_OFF
    assert console.data == b"hello from BUILD07\n"
    calls = zvm_env.calls()
    links = [["send", WORKER, "cp", "link", "*", d, d] for d in ("0150", "0250")]
    assert calls.index(links[0]) < calls.index(links[1]) < calls.index(["send", WORKER, "cp", "ipl", "0150"])
    assert buildstatus.read(zvm_env.swap_image) == 0
    swap = pair.swap.attach() if pair.swap else None  # back here to read the status
    assert swap is not None and buildstatus.read(swap) == 0
    pair.swap.detach() if pair.swap else None


def test_kill_forces_the_worker_and_is_idempotent(zvm_env: ZvmEnv) -> None:
    backend = zvm_env.backend()
    backend.kill()  # nothing running: nothing to do
    backend.logon()
    backend.kill()
    backend.kill()
    assert zvm_env.calls().count(["force", WORKER]) == 1
    assert zvm_env.state()["logged_on"][WORKER] is False


def test_fixup_writes_the_boot_record_with_the_agent_as_init(zvm_env: ZvmEnv) -> None:
    buildroot = zvm_env.tmp / "buildroot"
    buildroot.mkdir()
    zvm_env.backend().fixup(buildroot)
    (call,) = zvm_env.calls("zipl")
    assert call[:2] == ["-t", str(buildroot / "boot" / "zipl")]
    params = call[call.index("--parameters") + 1]
    assert "root=/dev/disk/by-path/ccw-0.0.0150-part1" in params
    assert f"init={zvm.GUEST_INIT}" in params and "vmpoff=LOGOFF" in params
    assert (buildroot / "boot" / "cloudbuild.initrd").read_bytes() == b"initrd"
    assert (buildroot / "boot" / "zipl" / "bootmap").exists()


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_fixup_merges_the_build_roots_modules_into_the_workers_initrd(zvm_env: ZvmEnv, compress: str) -> None:
    """The worker's initrd (a merged-/usr one here: lib -> usr/lib) gets the build root's
    /lib/modules/<release> trees; what it had stays. Checked by unpacking with the real cpio."""
    import gzip
    import io

    from local_backends.cpio import CpioWriter

    raw = io.BytesIO()
    cpio = CpioWriter(raw)
    cpio.file("init", b"#!/bin/sh\necho worker init\n", 0o755)
    cpio.symlink("lib", "usr/lib")
    cpio.file("usr/lib/modules/5.14-worker/kernel/worker.ko", b"worker module")
    cpio.close()
    given = zvm_env.tmp / "initrd"
    if compress == "gzip":
        given.write_bytes(gzip.compress(raw.getvalue()))
    else:
        given.write_bytes(
            subprocess.run(["zstd", "-c"], input=raw.getvalue(), capture_output=True, check=True).stdout
        )
    buildroot = zvm_env.tmp / "buildroot"
    modules = buildroot / "lib" / "modules" / "6.4.0-root"
    (modules / "kernel" / "drivers").mkdir(parents=True)
    (modules / "kernel" / "drivers" / "dasd_fba_mod.ko").write_bytes(b"\x7fELF root module")
    (modules / "modules.dep").write_text("kernel/drivers/dasd_fba_mod.ko:\n")
    zvm_env.backend().fixup(buildroot)
    merged = (buildroot / "boot" / "cloudbuild.initrd").read_bytes()
    assert merged[:2] == b"\x1f\x8b"
    out = zvm_env.tmp / "unpacked"
    out.mkdir()
    subprocess.run(["cpio", "-i", "-d", "-m", "--quiet"], input=gzip.decompress(merged), cwd=out, check=True)
    assert (out / "init").read_bytes() == b"#!/bin/sh\necho worker init\n" and (
        out / "init"
    ).stat().st_mode & 0o111
    assert (out / "lib").is_symlink()
    assert (out / "usr/lib/modules/5.14-worker/kernel/worker.ko").read_bytes() == b"worker module"
    root_modules = out / "usr/lib/modules/6.4.0-root"
    assert (root_modules / "kernel/drivers/dasd_fba_mod.ko").read_bytes() == b"\x7fELF root module"
    assert (root_modules / "modules.dep").read_text() == "kernel/drivers/dasd_fba_mod.ko:\n"
    (call,) = zvm_env.calls("zipl")
    assert call[call.index("-r") + 1] == str(buildroot / "boot" / "cloudbuild.initrd")


def test_whole_build_through_the_fakes_with_real_staging_and_extraction(
    zvm_env: ZvmEnv, rootfs: Path
) -> None:
    payload = {"repeat": "zvm-", "size": 200_001}
    zvm_env.update(
        guest={
            "status": 0,
            "files": {"results/RPMS/s390x/hello.rpm": payload, "_statistics": "MAX_mb_used_on_disk: 3\n"},
            "symlinks": {"results/hello.rpm": "RPMS/s390x/hello.rpm"},
            "console": "IPL from 0150\nbuild done\n",
        }
    )
    script = recipe(zvm_env.tmp / "src", "true\n")
    options = parse([*zvm_env.options("--vm-memory", "1024"), "--rootfs", str(rootfs)])
    outcome, console = flow(create_backend(options), options, zvm_env.tmp, script)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert tree(zvm_env.tmp / "out") == {
        "RPMS": "d",
        "RPMS/s390x": "d",
        "RPMS/s390x/hello.rpm": sha(guestplay.content(payload)),
        "hello.rpm": "l:RPMS/s390x/hello.rpm",
    }
    assert (zvm_env.tmp / "out.statistics").read_text() == "MAX_mb_used_on_disk: 3\n"
    assert b"build done" in console.data
    state = zvm_env.state()
    assert state["errors"] == [], state["errors"]
    assert state["local_links"] == {} and state["online"] == {}
    assert state["memory"][WORKER] == "1024M"
    assert "VM_SWAP='/dev/disk/by-path/ccw-0.0.0250-part1'" in state["guest_seen"]["build_data"]
    # the guest got a staged root with a boot record
    assert ".build" in state["guest_seen"]["root_entries"] and "boot" in state["guest_seen"]["root_entries"]
    calls = zvm_env.calls()
    order = [
        ["xautolog", WORKER],
        ["link", WORKER, "0150", "307", "MW"],  # prepare the root here
        ["detach", "307"],
        ["link", WORKER, "0250", "407", "MW"],  # reset the swap
        ["send", WORKER, "cp", "link", "*", "0150", "0150"],
        ["send", WORKER, "cp", "ipl", "0150"],
    ]
    positions = [calls.index(c) for c in order]
    assert positions == sorted(positions)
    assert len(zvm_env.calls("zipl")) == 1


def test_failed_build_on_zvm_extracts_nothing(zvm_env: ZvmEnv, rootfs: Path) -> None:
    zvm_env.update(guest={"status": 1, "files": {"results/x": "x"}})
    script = recipe(zvm_env.tmp / "src", "true\n")
    options = parse([*zvm_env.options(), "--rootfs", str(rootfs)])
    outcome, _ = flow(create_backend(options), options, zvm_env.tmp, script)
    assert outcome.exit_code == ExitCode.BUILD_FAILED
    assert not (zvm_env.tmp / "out").exists()
    assert zvm_env.state()["local_links"] == {}


def test_cloudbuild_kill_forces_the_worker_then_marks_the_swap(zvm_env: ZvmEnv) -> None:
    backend = zvm_env.backend()
    backend.logon()
    kill_slot(zvm_env.backend(), BuildSlot("k1", 7, zvm_env.tmp))
    state = zvm_env.state()
    assert state["logged_on"][WORKER] is False
    assert buildstatus.read(zvm_env.swap_image) == 1
    assert state["local_links"] == {} and state["online"] == {}
    calls = zvm_env.calls()
    assert calls.index(["force", WORKER]) < calls.index(["link", WORKER, "0250", "407", "MW"])
    kill_slot(zvm_env.backend(), BuildSlot("k1", 7, zvm_env.tmp))  # again: nothing running, fine
