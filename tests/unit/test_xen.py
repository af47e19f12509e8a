"""Xen backend against a fake `xl`/`xm` that records its calls and plays the guest on the disks."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloudbuild.backend import BuildSlot, create_backend
from cloudbuild.errors import ExitCode
from cloudbuild.options import parse
from local_backends.machines.xen import XenBackend, config_text, disk_spec
from tests.fakes import xl as fake_xl
from tests.vm import localbuild
from tests.vm.localbuild import REPO, flow, loop_devices_on, recipe, tree

rootfs = localbuild.rootfs  # the fixture

MIB = 1024 * 1024


@dataclass
class XenEnv:
    tmp: Path
    state_path: Path
    kernel: Path
    initrd: Path

    def state(self) -> dict[str, Any]:
        return fake_xl.load(self.state_path)

    def update(self, **changes: Any) -> None:
        state = self.state()
        state.update(changes)
        fake_xl.save(self.state_path, state)

    def options(self, root_dir: Path, *extra: str) -> Any:
        return parse(
            [
                "--vm-type", "xen", "--vm-kernel", str(self.kernel), "--vm-initrd", str(self.initrd),
                "--rootfs", str(root_dir), "--vm-disk-size", "64", "--vm-swap-size", "16", "--jobs", "2",
                "--vm-memory", "768", *extra,
            ]
        )  # fmt: skip


def make_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tools: tuple[str, ...]) -> XenEnv:
    state_path = tmp_path / "xl.json"
    fake_xl.save(state_path, fake_xl.new_state())
    bin_dir = tmp_path / "bin"
    fake_xl.install(bin_dir, state_path, REPO, tools=tools)
    # only the fakes: a real xm/xl on this host must not be found
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv(fake_xl.STATE_ENV, str(state_path))
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "initrd").write_bytes(b"initrd")
    return XenEnv(tmp_path, state_path, tmp_path / "vmlinuz", tmp_path / "initrd")


@pytest.fixture
def xen_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[XenEnv]:
    env = make_env(tmp_path, monkeypatch, ("xl",))
    yield env
    assert env.state()["domains"] == {}, "a domain was left running"
    assert loop_devices_on(tmp_path) == []


def test_config_file_is_the_seeds() -> None:
    text = config_text(
        kernel=Path("/boot/k"),
        initrd=Path("/boot/i"),
        memory_mib=768,
        vcpus=2,
        root_device="/dev/xvda",
        console="hvc0",
    )
    assert text.splitlines() == [
        'kernel = "/boot/k"',
        'ramdisk = "/boot/i"',
        "memory = 768",
        "vcpus = 2",
        'root = "/dev/xvda ro"',
        'extra = "init=/init console=hvc0 panic=1 udev_timeout=360"',
        'on_poweroff = "destroy"',
        'on_reboot = "destroy"',
        'on_crash = "destroy"',
    ]


def test_disks_are_file_for_images_and_phy_for_block_devices(tmp_path: Path) -> None:
    image = tmp_path / "root.img"
    image.write_bytes(b"")
    assert disk_spec(image, "/dev/xvda") == f"file:{image},xvda,w"
    assert disk_spec(Path("/dev/loop0"), "/dev/xvdb") == "phy:/dev/loop0,xvdb,w"


def test_whole_build_through_the_fake_xl_with_real_staging_and_extraction(
    xen_env: XenEnv,
    rootfs: Path,
) -> None:
    payload = {"repeat": "xen-result-", "size": 300_000}
    xen_env.update(
        guest={
            "status": 0,
            "files": {
                "results/RPMS/hello.rpm": payload,
                "results/OTHER/log.txt": "done\n",
                "_statistics": "MAX_mb_used_memory: 7\n",
            },
            "symlinks": {"results/latest.rpm": "RPMS/hello.rpm", "results/evil": "/etc/shadow"},
            "console": "guest console line\n",
        }
    )
    script = recipe(xen_env.tmp / "src", "true\n")
    options = xen_env.options(rootfs, "--build-id", "t1")
    outcome, console = flow(create_backend(options), options, xen_env.tmp, script)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    from tests.fakes.guestplay import content

    assert tree(xen_env.tmp / "out") == {
        "RPMS": "d",
        "RPMS/hello.rpm": __import__("hashlib").sha256(content(payload)).hexdigest(),
        "OTHER": "d",
        "OTHER/log.txt": __import__("hashlib").sha256(b"done\n").hexdigest(),
        "latest.rpm": "l:RPMS/hello.rpm",
    }
    assert (xen_env.tmp / "out.statistics").read_text() == "MAX_mb_used_memory: 7\n"
    assert b"guest console line" in console.data
    state = xen_env.state()
    (create,) = state["creates"]
    work = xen_env.tmp / "work"
    assert create["argv"][:4] == ["xl", "create", "-c", str(work / "xen.conf")]
    assert create["argv"][4] == 'name="build_t1"'
    assert create["disks"] == [f"file:{work / 'root.img'},xvda,w", f"file:{work / 'swap.img'},xvdb,w"]
    assert "init=/init" in create["extra"] and "cloudbuild.swap=/dev/xvdb" in create["extra"]
    assert "console=hvc0" in create["extra"] and "rootfstype=ext4" in create["extra"]
    assert 'ramdisk = "' + str(xen_env.initrd) + '"' in create["config"]
    assert "vcpus = 2" in create["config"] and "memory = 768" in create["config"]
    # the guest saw a staged root: build.data names its swap device
    assert "VM_SWAP='/dev/xvdb'" in state["guest_seen"]["build_data"]
    # purge (verify, for the given build id) came before anything else, and only once
    calls = [c[1:] for c in state["calls"]]
    assert calls[0] == ["list", "build_t1"]
    assert not (work / "xen.conf").exists() and not (work / "root.img").exists()


def test_failed_build_extracts_nothing(xen_env: XenEnv, rootfs: Path) -> None:
    xen_env.update(guest={"status": 1, "files": {"results/x": "x"}})
    script = recipe(xen_env.tmp / "src", "true\n")
    options = xen_env.options(rootfs)
    outcome, _ = flow(create_backend(options), options, xen_env.tmp, script)
    assert outcome.exit_code == ExitCode.BUILD_FAILED
    assert not (xen_env.tmp / "out").exists()


def test_an_existing_domain_is_refused(xen_env: XenEnv, rootfs: Path) -> None:
    # another service runs the same domain: it is not ours to destroy (no --build-id: no purge)
    xen_env.update(domains={"build_t1": 999999})
    script = recipe(xen_env.tmp / "src", "true\n")
    options = xen_env.options(rootfs)
    outcome, _ = flow(create_backend(options), options, xen_env.tmp, script)
    assert outcome.exit_code == ExitCode.INFRA
    assert "already exists" in outcome.message
    assert xen_env.state()["creates"] == []
    xen_env.update(domains={})


def test_a_leftover_domain_of_the_same_build_id_is_purged_before_the_disks(
    xen_env: XenEnv, rootfs: Path
) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    xen_env.update(domains={"build_t1": sleeper.pid})
    script = recipe(xen_env.tmp / "src", "true\n")
    options = xen_env.options(rootfs, "--build-id", "t1")
    outcome, _ = flow(create_backend(options), options, xen_env.tmp, script)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    assert sleeper.wait(timeout=10) != 0
    calls = [c[1:] for c in xen_env.state()["calls"]]
    assert calls[:2] == [["list", "build_t1"], ["destroy", "build_t1"]]


def test_timeout_destroys_the_domain(xen_env: XenEnv, rootfs: Path) -> None:
    xen_env.update(guest={"hang": True, "console": "hanging\n"})
    script = recipe(xen_env.tmp / "src", "true\n")
    options = xen_env.options(rootfs)
    from cloudbuild.build import PhaseLimits

    outcome, _ = flow(create_backend(options), options, xen_env.tmp, script, limits=PhaseLimits(boot=3))
    assert outcome.exit_code == ExitCode.INFRA
    assert ["xl", "destroy", "build_t1"] in xen_env.state()["calls"]


def test_xm_where_it_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rootfs: Path) -> None:
    env = make_env(tmp_path, monkeypatch, ("xm", "xl"))
    script = recipe(tmp_path / "src", "true\n")
    options = env.options(rootfs)
    backend = create_backend(options)
    assert isinstance(backend, XenBackend)
    outcome, _ = flow(backend, options, tmp_path, script)
    assert outcome.exit_code == ExitCode.OK, outcome.message
    (create,) = env.state()["creates"]
    work = tmp_path / "work"
    assert create["argv"][4:7] == [
        "name=build_t1",
        f"disk=file:{work / 'root.img'},hda1,w",
        f"disk=file:{work / 'swap.img'},hda2,w",
    ]
    assert "console=ttyS0" in create["extra"] and "cloudbuild.swap=/dev/hda2" in create["extra"]


def test_kill_destroys_and_is_idempotent(xen_env: XenEnv) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    xen_env.update(domains={"build_k1": sleeper.pid})
    backend = create_backend(parse(["--vm-type", "xen"]))
    backend.volumes(BuildSlot("k1", 0, xen_env.tmp))
    backend.kill()
    backend.kill()
    assert sleeper.wait(timeout=10) != 0
    calls = [c[1:] for c in xen_env.state()["calls"]]
    assert calls.count(["destroy", "build_k1"]) == 1


def test_block_devices_are_handed_over_as_phy(xen_env: XenEnv, rootfs: Path) -> None:
    image = xen_env.tmp / "dev.img"
    subprocess.run(["truncate", "-s", "64M", image], check=True)
    loop = subprocess.run(
        ["losetup", "--find", "--show", image], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        xen_env.update(guest={"status": 0, "files": {"results/a": "a\n"}})
        script = recipe(xen_env.tmp / "src", "true\n")
        options = xen_env.options(rootfs, "--vm-disk", loop)
        outcome, _ = flow(create_backend(options), options, xen_env.tmp, script)
        assert outcome.exit_code == ExitCode.OK, outcome.message
        (create,) = xen_env.state()["creates"]
        assert create["disks"][0] == f"phy:{loop},xvda,w"
        assert os.path.exists(loop)  # a block device is never deleted
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)


def test_cloudbuild_build_and_kill_commands_drive_the_fake(xen_env: XenEnv, rootfs: Path) -> None:
    from tests.vm.localbuild import cli_build, cli_kill

    xen_env.update(guest={"status": 0, "files": {"results/cli.txt": "via the command\n"}})
    script = recipe(xen_env.tmp / "src", "true\n")
    proc = cli_build(
        xen_env.tmp, xen_env.tmp / "cache", "xen", rootfs, script,
        "--vm-kernel", str(xen_env.kernel), "--vm-initrd", str(xen_env.initrd),
        "--vm-disk-size", "64", "--vm-swap-size", "16", "--build-id", "cli1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (xen_env.tmp / "out" / "cli.txt").read_text() == "via the command\n"
    assert cli_kill(xen_env.tmp, xen_env.tmp / "cache", "xen", "cli1").returncode == 0  # nothing running
