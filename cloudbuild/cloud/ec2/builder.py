"""The EC2 builder instance's boot hook (user-data): find the volumes by id, run the guest agent."""

from __future__ import annotations

from cloudbuild.cloud.ec2.devices import serial_of
from cloudbuild.errors import UsageError

HOOK_MARKER = "# cloudbuild-builder-hook v1"


def user_data(*, build_id: str, root: str, swap: str, device_timeout: int = 3600) -> str:
    """The boot hook shipped as user-data (see docs/ec2.md for the contract with the builder AMI).

    It finds the volumes by id through udev's NVMe links (never by device name), runs the guest
    agent, which writes BUILDSTATUS and the manifest to swap and powers the builder off. Only ids
    go in; nothing from the build itself (the recipe travels on the root volume).
    """
    for value in (build_id, root, swap):
        if not value.replace("-", "").replace("_", "").isalnum():
            raise UsageError(f"refusing to put {value!r} into the builder boot hook")
    return f"""#!/bin/sh
{HOOK_MARKER}
# build {build_id}: run the cloudbuild guest agent on root {root}, swap {swap}, then power off.
set -u
by_id=/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_
root="${{by_id}}{serial_of(root)}"
swap="${{by_id}}{serial_of(swap)}"
i=0
while [ ! -e "$root" ] || [ ! -e "$swap" ]; do
    i=$((i + 1))
    if [ "$i" -gt {device_timeout} ]; then
        echo "cloudbuild: volumes {root} {swap} did not appear" >/dev/console
        poweroff -f
    fi
    sleep 1
done
exec python3 -m cloudbuild.guest.agent --root "$(readlink -f "$root")" --swap "$(readlink -f "$swap")"
"""
