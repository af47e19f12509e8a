"""`cloudbuild gc --vm-type ec2`: the EC2 adapter of the shared sweep (`cloudbuild.cloud.common.sweep`).

It only lists (volumes, instances, snapshots, images tagged by cloudbuild), says whether an owner
or a build is alive, stamps and deletes; the seen-twice decision is the common policy's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import botocore.config
import botocore.session

from cloudbuild.cloud.base import WorkerGcAdapter
from cloudbuild.cloud.common import (
    TAG_GC_SEEN,
    GcAdapter,
    Resource,
    format_time,
    is_cloudbuild_tagged,
)
from cloudbuild.cloud.ec2.api import (
    NOT_FOUND,
    Ec2Api,
    Ec2Limits,
    client,
    tag_dict,
)
from cloudbuild.cloud.ec2.identity import Imds, WorkerIdentity
from cloudbuild.errors import InfraError
from cloudbuild.log import get_logger
from cloudbuild.retry import wait_for
from cloudbuild.volume import TAG_BUILD, TAG_OWNER

log = get_logger(__name__)

INSTANCE_ORDER = 10
IMAGE_ORDER = 20
VOLUME_ORDER = 30
SNAPSHOT_ORDER = 40

# --- GC adapter ---------------------------------------------------------------------------------


def _tag_filters() -> Iterator[list[dict[str, Any]]]:
    for key in (TAG_OWNER, TAG_BUILD):
        yield [{"Name": "tag-key", "Values": [key]}]


class Ec2GcAdapter(WorkerGcAdapter):
    """Lists, stamps and deletes cloudbuild's EC2 resources; `cloudbuild.cloud.common.sweep` decides."""

    def __init__(
        self,
        api: Ec2Api,
        *,
        limits: Ec2Limits | None = None,
        local_worker: str | None = None,
        state_dir: Path | None = None,
    ):
        super().__init__("ec2", local_worker=local_worker, directory=state_dir)
        self.api = api
        self.limits = limits or Ec2Limits()

    def list_resources(self) -> Iterable[Resource]:
        found: dict[str, Resource] = {}

        def add(kind: str, rid: str, tags: Iterable[Mapping[str, str]] | None, order: int) -> None:
            tagmap = tag_dict(tags)
            if is_cloudbuild_tagged(tagmap):
                found[rid] = Resource(kind, rid, tagmap, order)

        for filters in _tag_filters():
            for page in self._pages("describe_instances", "Reservations", Filters=filters):
                for instance in page.get("Instances", []):
                    if instance["State"]["Name"] != "terminated":
                        add("instance", instance["InstanceId"], instance.get("Tags"), INSTANCE_ORDER)
            for image in self._pages("describe_images", "Images", Owners=["self"], Filters=filters):
                add("image", image["ImageId"], image.get("Tags"), IMAGE_ORDER)
            for volume in self._pages("describe_volumes", "Volumes", Filters=filters):
                add("volume", volume["VolumeId"], volume.get("Tags"), VOLUME_ORDER)
            for snap in self._pages("describe_snapshots", "Snapshots", OwnerIds=["self"], Filters=filters):
                add("snapshot", snap["SnapshotId"], snap.get("Tags"), SNAPSHOT_ORDER)
        return list(found.values())

    def _pages(self, op: str, key: str, **params: Any) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            call_params = dict(params, **({"NextToken": token} if token else {}))
            result = self.api.must(op, **call_params)
            yield from result.get(key, [])
            token = result.get("NextToken")
            if not token:
                return

    def owner_alive(self, owner: str) -> bool:
        result = self.api.call(
            "describe_instances", InstanceIds=[owner], missing_ok=NOT_FOUND | {"InvalidInstanceID.Malformed"}
        )
        for reservation in (result or {}).get("Reservations", []):
            for instance in reservation.get("Instances", []):
                return str(instance["State"]["Name"]) not in ("terminated", "shutting-down")
        return False

    def tag_seen(self, resource: Resource, when: Any) -> None:
        if when is None:
            self.api.must("delete_tags", Resources=[resource.id], Tags=[{"Key": TAG_GC_SEEN}])
        else:
            self.api.must(
                "create_tags",
                Resources=[resource.id],
                Tags=[{"Key": TAG_GC_SEEN, "Value": format_time(when)}],
            )

    def delete_resource(self, resource: Resource) -> None:
        if resource.kind == "instance":
            self.api.call("terminate_instances", InstanceIds=[resource.id], missing_ok=NOT_FOUND)
            self._wait(lambda: self._instance_gone(resource.id), f"instance {resource.id} to terminate")
        elif resource.kind == "image":
            self.api.call("deregister_image", ImageId=resource.id, missing_ok=NOT_FOUND)
        elif resource.kind == "snapshot":
            self.api.call("delete_snapshot", SnapshotId=resource.id, missing_ok=NOT_FOUND)
        elif resource.kind == "volume":
            result = self.api.call("describe_volumes", VolumeIds=[resource.id], missing_ok=NOT_FOUND)
            volumes = (result or {}).get("Volumes", [])
            for att in volumes[0].get("Attachments", []) if volumes else []:
                self.api.call(
                    "detach_volume",
                    VolumeId=resource.id,
                    InstanceId=att["InstanceId"],
                    Force=True,
                    missing_ok=("IncorrectState", "InvalidAttachment.NotFound"),
                )
            if volumes and volumes[0].get("Attachments"):
                self._wait(lambda: self._volume_available(resource.id), f"volume {resource.id} to detach")
            self.api.call("delete_volume", VolumeId=resource.id, missing_ok=NOT_FOUND)
        else:
            raise InfraError(f"gc: unknown EC2 resource kind {resource.kind!r}")

    def _wait(self, probe: Callable[[], bool], what: str) -> None:
        wait_for(
            probe,
            what=what,
            timeout=self.limits.terminate,
            interval=self.limits.poll,
            max_interval=self.limits.poll_max,
        )

    def _instance_gone(self, instance_id: str) -> bool:
        return not self.owner_alive(instance_id) and self._instance_state(instance_id) in ("terminated", None)

    def _instance_state(self, instance_id: str) -> str | None:
        result = self.api.call("describe_instances", InstanceIds=[instance_id], missing_ok=NOT_FOUND)
        for reservation in (result or {}).get("Reservations", []):
            for instance in reservation.get("Instances", []):
                return str(instance["State"]["Name"])
        return None

    def _volume_available(self, volume_id: str) -> bool:
        result = self.api.call("describe_volumes", VolumeIds=[volume_id], missing_ok=NOT_FOUND)
        volumes = (result or {}).get("Volumes", [])
        return not volumes or (volumes[0].get("State") == "available" and not volumes[0].get("Attachments"))


def gc_adapter() -> GcAdapter:
    """The adapter `cloudbuild gc --vm-type ec2` uses.

    On a worker, IMDS names this host, so the sweep also finds builds whose process died here;
    elsewhere (an admin box) the region comes from botocore's settings and only dead owners and
    expired leases count.
    """
    region = botocore.session.get_session().get_config_variable("region")
    identity: WorkerIdentity | None = None
    try:
        identity = Imds().identity()
    except InfraError as exc:
        if not region:
            raise InfraError(f"gc: no region configured and no instance metadata ({exc})") from exc
        log.info("gc runs off EC2 (no instance metadata): dead owners and expired leases only")
    region = region or (identity.region if identity else None)
    return Ec2GcAdapter(
        Ec2Api(client(str(region))),
        local_worker=identity.instance_id if identity else None,
    )
