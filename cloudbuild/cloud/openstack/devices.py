"""Where an attached Cinder volume appears on this worker: by the serial the hypervisor puts on
the disk (the volume id, cut to 20 characters by virtio-blk), then the virtio-scsi name, and only
then the device Nova reports, once it is a block device."""

from __future__ import annotations

from pathlib import Path

from cloudbuild.disk.image import is_block_device

VIRTIO_SERIAL_LENGTH = 20  # virtio-blk serial numbers are at most 20 bytes


def device_candidates(dev_root: Path, volume_id: str) -> list[Path]:
    """Stable names udev gives the volume's disk, most specific first."""
    by_id = dev_root / "disk" / "by-id"
    return [
        by_id / f"virtio-{volume_id[:VIRTIO_SERIAL_LENGTH]}",
        by_id / f"scsi-0QEMU_QEMU_HARDDISK_{volume_id}",
        by_id / f"scsi-0QEMU_QEMU_HARDDISK_{volume_id[:VIRTIO_SERIAL_LENGTH]}",
    ]


def find_device(dev_root: Path, volume_id: str, nova_device: str | None) -> Path | None:
    """The local node of the attached volume, or None while it has not appeared yet."""
    for candidate in device_candidates(dev_root, volume_id):
        if candidate.exists():
            return candidate.resolve()
    if nova_device and nova_device.startswith("/dev/") and "/.." not in nova_device:
        # Nova's name is the guest's *suggested* name; only trust a real block device
        reported = dev_root / nova_device.removeprefix("/dev/")
        if is_block_device(reported):
            return reported
    return None
