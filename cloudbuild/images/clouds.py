"""The one place where the image code meets the cloud modules (their boot hooks, EC2's client
and error rules). When the clouds become packages, only these imports change.

The builder image runs a user-data script only when it carries a cloudbuild marker line; the
markers are taken from what the clouds' own hook generators write, so an image and the backends
cannot drift apart.
"""

from __future__ import annotations

from cloudbuild.cloud.ec2.api import client as ec2_client
from cloudbuild.cloud.ec2.api import transient as ec2_transient
from cloudbuild.cloud.ec2.api import translate as ec2_translate
from cloudbuild.cloud.ec2.builder import user_data as ec2_user_data
from cloudbuild.cloud.openstack.builder import user_data as openstack_user_data

__all__ = ["ec2_client", "ec2_transient", "ec2_translate", "ec2_user_data", "markers", "openstack_user_data"]

_SAMPLE_EC2 = "vol-0123456789abcdef0"


def markers(cloud: str) -> list[str]:
    """The marker line(s) of the `cloud`'s builder hook: its second line (after `#!/bin/sh`)."""
    if cloud == "ec2":
        hook = ec2_user_data(build_id="sample", root=_SAMPLE_EC2, swap=_SAMPLE_EC2)
    else:
        hook = openstack_user_data(fstype="ext4", mount_options="")
    return [hook.splitlines()[1].strip()]
