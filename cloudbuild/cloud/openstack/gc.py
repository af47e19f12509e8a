"""The OpenStack GC adapter (`cloudbuild.cloud.common.GcAdapter`): lists, stamps and deletes the
servers and volumes cloudbuild tagged; the policy is `cloudbuild.cloud.common.sweep`."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from pathlib import Path

from cloudbuild.cloud.base import WorkerGcAdapter
from cloudbuild.cloud.common import Resource, format_time, is_cloudbuild_tagged
from cloudbuild.cloud.openstack.api import Api, connect
from cloudbuild.cloud.openstack.builder import Builder
from cloudbuild.cloud.openstack.identity import worker_server_id
from cloudbuild.cloud.openstack.volume import CinderVolume
from cloudbuild.errors import CloudbuildError
from cloudbuild.log import get_logger
from cloudbuild.volume import TAG_GC_SEEN

log = get_logger(__name__)


class OpenStackGc(WorkerGcAdapter):
    """The GC adapter (cloudbuild.cloud.common.GcAdapter): servers and volumes cloudbuild tagged."""

    SERVER_ORDER = 0  # servers first: deleting one releases the volumes it holds
    VOLUME_ORDER = 1

    def __init__(self, api: Api, *, local_worker: str | None = None, state_dir: Path | None = None):
        super().__init__("openstack", local_worker=local_worker, directory=state_dir)
        self.api = api

    def list_resources(self) -> Iterable[Resource]:
        compute, storage = self.api.conn.compute, self.api.conn.block_storage
        servers = self.api.call("list servers", lambda: list(compute.servers(details=True)))
        volumes = self.api.call("list volumes", lambda: list(storage.volumes(details=True)))
        resources = [
            Resource("server", str(s.id), dict(s.metadata or {}), self.SERVER_ORDER)
            for s in servers
            if is_cloudbuild_tagged(s.metadata or {}) and s.status not in ("DELETED", "SOFT_DELETED")
        ]
        resources += [
            Resource("volume", str(v.id), dict(v.metadata or {}), self.VOLUME_ORDER)
            for v in volumes
            if is_cloudbuild_tagged(v.metadata or {}) and v.status != "deleting"
        ]
        return resources

    def owner_alive(self, owner: str) -> bool:
        compute = self.api.conn.compute
        server = self.api.find(f"get server {owner}", lambda: compute.get_server(owner))
        return server is not None and server.status not in ("DELETED", "SOFT_DELETED")

    def tag_seen(self, resource: Resource, when: dt.datetime | None) -> None:
        compute, storage = self.api.conn.compute, self.api.conn.block_storage
        what = f"mark {resource.kind} {resource.id}"
        if when is not None:
            stamp = {TAG_GC_SEEN: format_time(when)}
            if resource.kind == "server":
                self.api.find(what, lambda: compute.set_server_metadata(resource.id, **stamp))
            else:
                self.api.find(what, lambda: storage.set_volume_metadata(resource.id, **stamp))
        elif resource.kind == "server":
            self.api.find(what, lambda: compute.delete_server_metadata(resource.id, [TAG_GC_SEEN]))
        else:
            self.api.find(what, lambda: storage.delete_volume_metadata(resource.id, keys=[TAG_GC_SEEN]))

    def delete_resource(self, resource: Resource) -> None:
        if resource.kind == "server":
            builder = Builder(self.api, name=resource.id)
            builder.id = resource.id
            builder.delete()
            return
        volume = CinderVolume.existing(self.api, resource.id)
        volume.detach()
        volume.delete()


def gc_adapter(*, api: Api | None = None, metadata_url: str | None = None) -> OpenStackGc:
    """`cloudbuild gc --vm-type openstack`: the adapter over the cloud of OS_CLOUD / OS_*.

    On a worker, the metadata service names this server, so the sweep also finds builds whose
    process died here; elsewhere (an admin box) only dead owners and expired leases count."""
    try:
        local: str | None = worker_server_id(None, url=metadata_url, deadline=5.0)
    except CloudbuildError as exc:
        log.info(
            "gc runs off a worker (no metadata service): dead owners and expired leases only", error=str(exc)
        )
        local = None
    return OpenStackGc(api or Api(connect()), local_worker=local)
