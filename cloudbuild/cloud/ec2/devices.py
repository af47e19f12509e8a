"""Where an attached EBS volume shows up on this host, and which device name to ask EC2 for.

EC2 takes a device name (`/dev/sdf`) at attach time, but on Nitro instances the volume appears as
an NVMe namespace whose number has nothing to do with that name. The volume id is the only thing
that identifies it, so we resolve by id, in this order:

1. udev's link `/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol<id without dash>`;
2. the NVMe controller serial (`vol<id without dash>`) in `/sys/class/nvme/nvme*/serial`, then
   that controller's namespace block device (`nvmeXnY`); where sysfs has no serial, `nvme id-ctrl`;
3. Xen instances (no NVMe): the requested name, as `/dev/sdX` or its `/dev/xvdX` alias.

Never "the newest device": with several build slots on one host that picks a neighbour's disk.
`/dev` and `/sys` are injectable so tests run on plain folders.

Device names are picked under a host-wide `fcntl` lock, skipping every name in use per the
instance's block device mappings and the attachments in progress, so slots never collide.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cloudbuild.errors import InfraError
from cloudbuild.log import get_logger
from cloudbuild.runner import CommandError, run, which

log = get_logger(__name__)

BY_ID_PREFIX = "nvme-Amazon_Elastic_Block_Store_"
# AWS recommends /dev/sd[f-p] for EBS on Linux; q-z are usable too.
CANDIDATE_NAMES = tuple(f"/dev/sd{c}" for c in "fghijklmnopqrstuvwxyz")


@dataclass(frozen=True)
class HostPaths:
    """Roots of the device tree and sysfs on this host (tests use folders)."""

    dev: Path = Path("/dev")
    sys: Path = Path("/sys")


def serial_of(volume_id: str) -> str:
    """The NVMe serial / by-id suffix EBS uses: the volume id without its dash."""
    return volume_id.replace("-", "")


def _by_id(volume_id: str, paths: HostPaths) -> Path | None:
    link = paths.dev / "disk" / "by-id" / f"{BY_ID_PREFIX}{serial_of(volume_id)}"
    if link.exists():
        return link.resolve()
    return None


def _namespaces(controller: Path) -> list[str]:
    """The namespace block devices of an NVMe controller in sysfs (nvme1n1, ...), sorted."""
    name = controller.name
    try:
        entries = [e.name for e in controller.iterdir()]
    except OSError:
        return []
    return sorted(e for e in entries if e.startswith(name + "n") and e[len(name) + 1 :].isdigit())


def _controller_serial(controller: Path, paths: HostPaths) -> str | None:
    try:
        return (controller / "serial").read_text(errors="replace").strip()
    except OSError:
        pass
    nvme = which("nvme")
    if nvme is None:
        return None
    try:
        proc = run([nvme, "id-ctrl", "-o", "json", paths.dev / controller.name], timeout=20)
        sn = json.loads(proc.stdout).get("sn", "")
    except (CommandError, ValueError, AttributeError):
        return None
    return str(sn).strip() or None


def _by_serial(volume_id: str, paths: HostPaths) -> Path | None:
    root = paths.sys / "class" / "nvme"
    if not root.is_dir():
        return None
    want = serial_of(volume_id)
    for controller in sorted(root.iterdir()):
        if _controller_serial(controller, paths) != want:
            continue
        namespaces = _namespaces(controller)
        if not namespaces:
            return None  # the controller is there, its namespace not yet: wait
        node = paths.dev / namespaces[0]
        return node if node.exists() else None
    return None


def _xen_alias(device_name: str, paths: HostPaths) -> Path | None:
    if not device_name.startswith("/dev/sd"):
        return None
    letter = device_name[len("/dev/sd") :]
    if (paths.sys / "class" / "nvme").is_dir() and any((paths.sys / "class" / "nvme").iterdir()):
        return None  # a Nitro host: names mean nothing, only the serial counts
    for candidate in (paths.dev / f"sd{letter}", paths.dev / f"xvd{letter}"):
        if candidate.exists():
            return candidate
    return None


def resolve_device(volume_id: str, device_name: str | None, paths: HostPaths) -> Path | None:
    """The local node of an attached EBS volume, or None while it has not appeared yet."""
    node = _by_id(volume_id, paths) or _by_serial(volume_id, paths)
    if node is None and device_name:
        node = _xen_alias(device_name, paths)
    return node


def pick_device_name(in_use: Iterable[str]) -> str:
    """The first candidate name not in use (names compared without /dev/ and the xvd/sd spelling)."""

    def norm(name: str) -> str:
        base = name.removeprefix("/dev/")
        return "sd" + base[3:] if base.startswith("xvd") else base

    used = {norm(n) for n in in_use}
    for name in CANDIDATE_NAMES:
        if norm(name) not in used:
            return name
    raise InfraError(f"no free EBS device name on this worker: {len(used)} in use")
