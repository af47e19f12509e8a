"""The worker host around the fake OpenStack: image files for volumes, udev, and a builder.

`Emulation(fake, tmp_path)` extends a started `tests.fakes.openstack.FakeOpenStack` through its
public observer hooks (`on_volume_created`, `on_attached`, `on_detached`, `on_booted`) so that
the real backend code runs end to end on one machine:

- every Cinder volume is an image file (`images/<volume id>.img`, sparse, of the volume's size);
- "udev": while a volume is attached to the worker server, `dev/disk/by-id/virtio-<id[:20]>`
  under `dev_root` is a symlink to its image file, gone again when it is detached;
- the builder: when a builder server goes ACTIVE (created or started), `guest(server_id, disks)`
  runs in a thread with the image files of the volumes its metadata names (root, swap), as the
  boot hook finds them, and then the server powers off (`fake.power_off`), as a builder's guest
  agent does. `guest` may be a scripted guest (`scripted_guest`) or the local qemu backend
  booting the image files.
- `tagged()`: cloudbuild-tagged servers and volumes still in the cloud (the leak check).
"""

from __future__ import annotations

import contextlib
import os
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudbuild.cloud.openstack.api import Timeouts
from cloudbuild.cloud.openstack.backend import OpenStackBackend
from cloudbuild.cloud.openstack.builder import TAG_ROOT_VOLUME, TAG_SWAP_VOLUME
from cloudbuild.disk import buildstatus
from cloudbuild.options import VmOptions
from cloudbuild.volume import Role, VolumePair
from tests.fakes import timings
from tests.fakes.openstack import Bdm, FakeOpenStack, FakeServer, FakeVolume

GIB = 1024 * 1024 * 1024

Guest = Callable[[str, list[Path], "Emulation"], str | None]
"""A builder's life: gets the server id and its disks (root, swap), returns console text to end
with a power-off, or None when it ended otherwise (ERROR, vanished, never)."""


def scripted_guest(status: int = 0, console: str = "building...\nBUILDSTATUS written\n") -> Guest:
    """A guest that writes BUILDSTATUS<status> on swap and says `console`."""

    def run(server_id: str, disks: list[Path], emu: Emulation) -> str:
        buildstatus.write(disks[1], status)
        return console

    return run


@dataclass
class Emulation:
    fake: FakeOpenStack
    base: Path
    guest: Guest | None = None
    errors: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    booted: list[str] = field(default_factory=list)
    on_volume: Callable[[FakeVolume], None] | None = None  # called for every volume created

    def __post_init__(self) -> None:
        self.images = self.base / "images"
        self.dev_root = self.base / "dev"
        self.images.mkdir(parents=True, exist_ok=True)
        (self.dev_root / "disk" / "by-id").mkdir(parents=True, exist_ok=True)
        self.fake.on_volume_created(self._volume_created)
        self.fake.on_attached(self._attached)
        self.fake.on_detached(self._detached)
        self.fake.on_booted(self._booted)

    # -- the fake's observers (called with its lock held) -------------------------------------------
    def _volume_created(self, vol: FakeVolume) -> None:
        with open(self.image(vol.id), "wb") as f:
            f.truncate(vol.size * GIB)
        if self.on_volume is not None:
            self.on_volume(vol)

    def _attached(self, server: FakeServer, vol: FakeVolume, bdm: Bdm) -> None:
        if server.id == self.fake.worker_server_id:
            link = self.link(vol.id)
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(self.image(vol.id))

    def _detached(self, server: FakeServer, vol: FakeVolume) -> None:
        if server.id == self.fake.worker_server_id:
            with contextlib.suppress(FileNotFoundError):
                self.link(vol.id).unlink()

    def _booted(self, server: FakeServer) -> None:
        if server.id != self.fake.worker_server_id and self.guest is not None:
            disks = self._boot_hook_disks(server)
            if disks is None:
                thread = threading.Thread(target=self._hook_gives_up, args=(server.id,), daemon=True)
            else:
                thread = threading.Thread(target=self._run_guest, args=(server.id, disks), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _boot_hook_disks(self, server: FakeServer) -> list[Path] | None:
        """What the builder's boot hook finds: the volumes its server metadata names (read at
        every boot), if they are attached to it; None when it finds none (it powers off)."""
        ids = [server.metadata.get(TAG_ROOT_VOLUME), server.metadata.get(TAG_SWAP_VOLUME)]
        attached = {b.volume_id for b in server.bdms}
        if not all(i in attached for i in ids):
            return None
        return [self.image(str(i)) for i in ids]

    def _hook_gives_up(self, server_id: str) -> None:
        self.booted.append(server_id)
        with contextlib.suppress(Exception):
            self.fake.power_off(server_id, "cloudbuild: no volume ids in the server metadata\n")

    def image(self, volume_id: str) -> Path:
        return self.images / f"{volume_id}.img"

    def link(self, volume_id: str) -> Path:
        return self.dev_root / "disk" / "by-id" / f"virtio-{volume_id[:20]}"

    def _run_guest(self, server_id: str, disks: list[Path]) -> None:
        assert self.guest is not None
        self.booted.append(server_id)
        console: str | None = ""
        try:
            console = self.guest(server_id, disks, self)
        except Exception:
            self.errors.append(traceback.format_exc())
            console = "guest crashed\n"
        if console is not None:
            with contextlib.suppress(Exception):  # the server may have been deleted meanwhile
                self.fake.power_off(server_id, console)

    def join(self, timeout: float = 60.0) -> None:
        for thread in self.threads:
            thread.join(timeout)

    def tagged(self) -> dict[str, list[str]]:
        """Servers and volumes that carry cloudbuild's tags: after a build there must be none."""
        with self.fake.lock:
            servers = [s.id for s in self.fake.cloud.servers.values() if _tagged(s.metadata)]
            volumes = [v.id for v in self.fake.cloud.volumes.values() if _tagged(v.metadata)]
        return {"servers": servers, "volumes": volumes}

    def attached_here(self) -> list[str]:
        return sorted(os.listdir(self.dev_root / "disk" / "by-id"))


def _tagged(metadata: dict[str, str]) -> bool:
    return "cloudbuild:owner" in metadata or "cloudbuild:build" in metadata


# -- the worker side of a test build -------------------------------------------------------------


def make_backend(
    metadata_base: str,
    dev_root: Path,
    state_dir: Path,
    *,
    timeouts: Timeouts = timings.OPENSTACK,
    **options: Any,
) -> OpenStackBackend:
    """The backend as a worker builds it, pointed at the fake's metadata service and our /dev."""
    defaults: dict[str, Any] = {
        "vm_type": "openstack",
        "vm_kernel": "cirros",
        "disk_size": 1024,
        "swap_size": 1024,
    }
    return OpenStackBackend(
        VmOptions(**(defaults | options)),
        timeouts=timeouts,
        dev_root=dev_root,
        state_dir=state_dir,
        metadata_url=metadata_base + "/openstack/latest/meta_data.json",
    )


# -- a real builder: the local qemu backend plays the server ---------------------------------------


class ServerConsole:
    """A Console that appends to the fake server's console log (what os-getConsoleOutput returns)."""

    def __init__(self, fake: FakeOpenStack, server_id: str):
        self.fake = fake
        self.server_id = server_id

    def write(self, data: bytes) -> None:
        with contextlib.suppress(Exception):  # the server may be gone already
            self.fake.append_console(self.server_id, data.decode("utf-8", "replace"))


def nova_argv(argv: list[str], root_id: str, swap_id: str) -> list[str]:
    """qemu's command line as Nova's libvirt driver would make it: disk serials are volume ids
    (20 characters for virtio-blk), and the agent finds root and swap by those serials, as the
    builder image's boot hook does (`openstack_server.user_data`)."""
    serials = {"serial=0": f"serial={root_id[:20]}", "serial=1": f"serial={swap_id[:20]}"}
    out: list[str] = []
    for arg in argv:
        for old, new in serials.items():
            if arg.startswith("virtio-blk-pci,") and arg.endswith(old):
                arg = arg[: -len(old)] + new
        if arg.startswith("console=") and "root=/dev/disk/by-id/virtio-0" in arg:
            arg = arg.replace("root=/dev/disk/by-id/virtio-0", f"root=/dev/disk/by-id/virtio-{root_id[:20]}")
            arg += f" cloudbuild.swap=/dev/disk/by-id/virtio-{swap_id[:20]}"
        out.append(arg)
    return out


def qemu_guest(*, timeout: float, memory_mib: int = 512) -> Guest:
    """The builder server played by the local qemu backend (TCG) with the real guest agent."""
    from local_backends.localvolume import LocalVolume
    from local_backends.machines.qemu import QemuBackend
    from local_backends.machines.vmproc import run_machine

    def run(server_id: str, disks: list[Path], emu: Emulation) -> str:
        root, swap = disks
        qemu = QemuBackend(VmOptions(vm_type="qemu", vm_memory=memory_mib))
        qemu.verify()
        pair = VolumePair(
            LocalVolume(Role.ROOT, root, 0, owned=False), LocalVolume(Role.SWAP, swap, 0, owned=False)
        )
        argv = nova_argv(qemu.machine(pair).argv(), root.stem, swap.stem)
        exit_ = run_machine(argv, ServerConsole(emu.fake, server_id), timeout=timeout)
        if exit_.returncode != 0:
            return f"qemu exited {exit_.returncode} (timed out: {exit_.timed_out})\n"
        return ""

    return run
