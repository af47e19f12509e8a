"""What makes a Debian tree a cloudbuild builder or worker image (on top of `tree.configure_base`)."""

from __future__ import annotations

from pathlib import Path

from cloudbuild.images import clouds
from cloudbuild.images.tree import copy_guest_package, in_chroot, write

KINDS = ("builder",)  # the worker image is not built yet (docs/images.md, "Left to do")
CLOUDS = ("ec2", "openstack")
GUEST_DIR = "/usr/lib/cloudbuild"
# what the guest agent and the boot unit import (stdlib only); tests/images/test_guest_modules.py
# imports the agent from such a copy, so a new import that is not listed here fails there
GUEST_MODULES = [
    "guest",
    "disk",
    "errors.py",
    "buildroot/__init__.py",
    "buildroot/builddata.py",
    "images/__init__.py",
    "images/bootfetch.py",
]  # the OpenStack hook puts this on PYTHONPATH; a .pth does for EC2's

# qemu's (or any non-Nitro) NVMe controller has another model string than EBS's, so udev's
# standard rules never make the `nvme-Amazon_Elastic_Block_Store_<serial>` link the EC2 hook looks
# for. This rule makes it from the serial in sysfs (EBS: the volume id without its dash) whatever
# the model; on Nitro it names the same link the standard rules make.
EBS_SERIAL_RULE = (
    'ACTION!="remove", SUBSYSTEM=="block", KERNEL=="nvme*n*", ENV{DEVTYPE}=="disk", '
    'ATTRS{serial}=="vol?*", SYMLINK+="disk/by-id/nvme-Amazon_Elastic_Block_Store_$attr{serial}"\n'
)

BOOT_HOOK_UNIT = """[Unit]
Description=cloudbuild: fetch the user data, run the builder boot hook
Wants=systemd-networkd.service systemd-udevd.service
After=systemd-networkd.service systemd-udevd.service local-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/python3 -m cloudbuild.images.bootfetch --cloud {cloud}
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity

[Install]
WantedBy=multi-user.target
"""


def packages(kind: str, cloud: str) -> list[str]:
    """What `kind` needs beyond tree.BASE_PACKAGES (the builder: nothing)."""
    return []


def configure_builder(root: Path, cloud: str) -> None:
    """The guest agent and the boot hook runner (stdlib only), the markers of `cloud`'s hook, the
    EBS serial rule; no sshd and no login on any console."""
    copy_guest_package(root, GUEST_MODULES, GUEST_DIR)
    write(root, "/etc/cloudbuild/hook-markers", "\n".join(clouds.markers(cloud)) + "\n")
    write(root, "/etc/udev/rules.d/60-cloudbuild-ebs-serial.rules", EBS_SERIAL_RULE)
    write(root, "/etc/systemd/system/cloudbuild-boot-hook.service", BOOT_HOOK_UNIT.format(cloud=cloud))
    in_chroot(root, "systemctl", "enable", "cloudbuild-boot-hook.service")
