"""`--vm-type openstack`: builds on OpenStack, with Cinder volumes as root and swap (openstacksdk).

    worker (a server)                          builder (a server per build)
    create root+swap volumes (Cinder, tagged)
    attach root here (Nova), mkfs, stage, detach
                               boot from the builder image with root+swap as block devices,
                               user-data runs the guest agent, which powers the server off
    console streamed into the build log                       delete the server
    attach swap+root here, status, extract, detach, delete the volumes

The pieces live beside this file: `openstack_api` (connection, retries, errors, worker id),
`openstack_volume` (CinderVolume), `openstack_server` (the builder server and its boot hook),
`openstack_console` (console streaming). This module is the Backend and the GC adapter; the
policy above them (phases, cleanup, exit codes, seen-twice GC) is not here, it is the same for
every cloud. docs/openstack.md is the operator's guide.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

from cloudbuild.backend import BootResult, BuildSlot, Console, ExitReason, register
from cloudbuild.cloud.base import AttachHealth, CloudBackend, RunningElsewhere, mark_swap_killed
from cloudbuild.cloud.common import TAG_POOL, build_tags, lease_expiry
from cloudbuild.cloud.openstack.api import Api, Timeouts, connect
from cloudbuild.cloud.openstack.builder import Builder, choose_flavor, user_data, volume_metadata
from cloudbuild.cloud.openstack.devices import VIRTIO_SERIAL_LENGTH
from cloudbuild.cloud.openstack.identity import worker_server_id
from cloudbuild.cloud.openstack.volume import CinderVolume
from cloudbuild.disk.mkfs import mount_options
from cloudbuild.errors import CloudbuildError, InfraError, UsageError
from cloudbuild.log import bound, get_logger
from cloudbuild.options import VmOptions
from cloudbuild.volume import TAG_BUILD, TAG_OWNER, Role, Volume, VolumePair

log = get_logger(__name__)


_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")


def _server_name(slot: BuildSlot, options: VmOptions) -> str:
    """The builder's name: obs-build's `--vm-worker NAME` (the instance to be created), else ours."""
    return options.vm_worker or f"cloudbuild-{slot.build_id}-{slot.slot}"


def _volume_ref(value: str | None) -> str | None:
    """obs-build passes volume names as --vm-disk/--vm-swap for OpenStack; a path is not one."""
    if value is None or "/" in value:
        return None
    return value


@register
class OpenStackBackend(CloudBackend):
    name = "openstack"
    cloud = "openstack"
    channel = "swap"

    def __init__(
        self,
        options: VmOptions,
        *,
        api: Api | None = None,
        timeouts: Timeouts | None = None,
        dev_root: Path = Path("/dev"),
        state_dir: Path | None = None,
        metadata_url: str | None = None,
    ):
        super().__init__(options, state_dir=state_dir)
        self._api = api
        self._own_api = api is None
        self._timeouts = timeouts
        self.dev_root = dev_root
        self.metadata_url = metadata_url
        self.builder: Builder | None = None
        self._builder_reusable = False  # powered itself off, volumes back: may join the pool
        self._flavor: str | None = None
        self._image: str | None = None

    # -- setup ---------------------------------------------------------------------------------
    @property
    def api(self) -> Api:
        if self._api is None:
            self._api = Api(connect(), timeouts=self._timeouts)
        return self._api

    @cached_property
    def worker(self) -> str:
        """This worker's server id (`--vm-server`, else the metadata service)."""
        return worker_server_id(self.options.vm_server, url=self.metadata_url)

    @property
    def worker_id(self) -> str:
        return self.worker

    @cached_property
    def health(self) -> AttachHealth:
        return AttachHealth(self.worker, self.state_dir, broken_after=2)

    def verify(self) -> None:
        o = self.options
        if not o.vm_kernel:
            raise UsageError(
                "--vm-type openstack needs the builder image: --vm-kernel IMAGE (name or id; "
                "see docs/openstack.md)"
            )
        if o.openstack_network is None:
            log.info("builder gets no network (pass --openstack-network NET to give it one)")
        elif not _UUID.fullmatch(o.openstack_network):
            raise UsageError(
                f"--openstack-network {o.openstack_network}: give the network's id "
                "(`openstack network show NAME -f value -c id`)"
            )
        worker = self.worker
        compute = self.api.conn.compute
        server = self.api.find(f"get worker server {worker}", lambda: compute.get_server(worker))
        if server is None:
            raise UsageError(
                f"worker server {worker} does not exist in this project: check --vm-server or the "
                "cloud the credentials point at (OS_CLOUD)"
            )
        self._image = self._find_image(o.vm_kernel)
        self._flavor = self._choose_flavor()
        log.info("openstack verified", worker=worker, image=self._image, flavor=self._flavor)

    def _find_image(self, ref: str) -> str:
        """The builder image by id, else by name (exactly one)."""
        glance = self.api.conn.image
        image = self.api.find(f"get builder image {ref}", lambda: glance.get_image(ref))
        if image is not None:
            return str(image.id)
        named = self.api.call(f"find builder image {ref}", lambda: list(glance.images(name=ref)))
        if len(named) > 1:
            raise UsageError(f"--vm-kernel: {len(named)} images are named '{ref}'; give the image id")
        if not named:
            raise UsageError(f"--vm-kernel: no image named or with id '{ref}' (the builder image)")
        return str(named[0].id)

    def _choose_flavor(self) -> str:
        o = self.options
        compute = self.api.conn.compute
        if o.openstack_flavor:
            ref = o.openstack_flavor
            flavor = self.api.call(
                f"find flavor {ref}", lambda: compute.find_flavor(ref, ignore_missing=True)
            )
            if flavor is None:
                raise UsageError(f"--openstack-flavor: no flavor named or with id '{ref}'")
            return str(flavor.id)
        flavors = self.api.call("list flavors", lambda: list(compute.flavors(details=True)))
        choice = choose_flavor(flavors, memory_mib=o.vm_memory, vcpus=o.jobs)
        log.info("flavor chosen", flavor=choice.name, vcpus=choice.vcpus, ram=choice.ram)
        return choice.id

    def volumes(self, slot: BuildSlot) -> VolumePair:
        if not self.acquire_build_lock(slot):
            self.pair = VolumePair(RunningElsewhere(Role.ROOT, slot.build_id))
            return self.pair
        o = self.options
        expires = lease_expiry(o.build_timeout)
        root_ref = o.vm_volume_root or _volume_ref(o.vm_image)
        swap_ref = o.vm_volume_swap if o.vm_volume_root else _volume_ref(o.vm_swap)

        def make(role: Role, size_mib: int, ref: str | None) -> CinderVolume:
            tags = build_tags(
                owner=self.worker, build=slot.build_id, slot=slot.slot, expires=expires, role=role.value
            )
            return CinderVolume(
                self.api,
                role,
                size_mib,
                worker=self.worker,
                name=f"cloudbuild-{slot.build_id}-{slot.slot}-{role}",
                owned=ref is None,
                ref=ref,
                tags=tags,
                dev_root=self.dev_root,
                health=self.health,
            )

        self.pair = VolumePair(make(Role.ROOT, o.disk_size, root_ref), make(Role.SWAP, o.swap_size, swap_ref))
        return self.pair

    @property
    def guest_swap_device(self) -> str | None:
        """VM_SWAP in build.data: the swap as the builder's udev names it (by virtio serial)."""
        if self.pair is None or self.pair.swap is None or self.running_elsewhere is not None:
            return None
        return f"/dev/disk/by-id/virtio-{self.pair.swap.id[:VIRTIO_SERIAL_LENGTH]}"

    # -- the build machine ---------------------------------------------------------------------
    @property
    def _pool_lock(self) -> Path:
        return self.state_dir / "pool.lock"

    def boot_and_wait(
        self, pair: VolumePair, slot: BuildSlot, *, timeout: float | None, console: Console
    ) -> BootResult:
        if self._image is None or self._flavor is None:
            raise InfraError("openstack backend: boot before verify")
        if pair.swap is None:
            raise InfraError("openstack backend: a build needs a swap volume (the status channel)")
        o = self.options
        root, swap = pair.root, pair.swap
        builder = self.builder = Builder(self.api, name=_server_name(slot, self.options))
        self._builder_reusable = False
        pooling = o.openstack_pool > 0
        metadata = build_tags(
            owner=self.worker,
            build=slot.build_id,
            slot=slot.slot,
            expires=lease_expiry(o.build_timeout),
            role="builder",
            extra=volume_metadata(root.id, swap.id) | ({TAG_POOL: self.worker} if pooling else {}),
        )
        script = user_data(fstype=o.filesystem, mount_options=mount_options(o.filesystem, o.mount_options))
        result: BootResult | None = None
        claimed = False
        try:
            claimed = pooling and builder.claim(
                owner=self.worker, image=self._image, metadata=metadata, lock=self._pool_lock
            )
            if claimed:
                for volume in (root, swap):  # Nova attaches to a stopped server; the hook finds them
                    volume.attach(builder.id)
                builder.start()
            else:
                builder.create(
                    image=self._image,
                    flavor=self._flavor,
                    network=o.openstack_network,
                    volumes=[root.id, swap.id],
                    metadata=metadata,
                    script=script,
                )
            with bound(server=builder.id, pool=claimed):
                result = builder.run(
                    timeout=timeout,
                    console=console,
                    killed=lambda: self.killed(slot),
                    skip_earlier_console=claimed,
                )
        finally:
            # the volumes are only free once the server let go of them: on every path
            self._builder_reusable = self._take_volumes_back(builder, root, swap, pooling, result)
        if result.reason == ExitReason.KILLED:
            mark_swap_killed(swap)
        return result

    def _take_volumes_back(
        self, builder: Builder, root: Volume, swap: Volume, pooling: bool, result: BootResult | None
    ) -> bool:
        """Detach the volumes from a builder that may join the pool, else delete it; whether it may."""
        if pooling and result is not None and result.reason == ExitReason.POWERED_OFF:
            try:
                root.detach()
                swap.detach()
                return True
            except CloudbuildError as exc:
                log.warning("volumes did not come back from the builder, deleting it", error=str(exc))
        builder.delete()
        return False

    def kill(self) -> None:
        """This process' builder: delete it. Another process' (`cloudbuild kill`): mark and stop it."""
        if self.builder is not None:
            self.builder.kill()
            return
        if self.slot is None:
            return
        name = _server_name(self.slot, self.options)
        compute = self.api.conn.compute
        servers = self.api.call(f"find server {name}", lambda: list(compute.servers(details=True)))
        for server in servers:
            meta = server.metadata or {}
            # a claimed pool builder keeps the name of the build it was created for
            ours = server.name == name or meta.get(TAG_BUILD) == self.slot.build_id
            if ours and meta.get(TAG_OWNER) == self.worker:
                builder = Builder(self.api, name=name)
                builder.id = str(server.id)
                builder.stop_killed()

    def release_builder(self) -> None:
        """Delete the builder, or hand it back to the pool when it powered itself off; idempotent."""
        builder, self.builder = self.builder, None
        if builder is None or builder.id is None:
            return
        keep, self._builder_reusable = self._builder_reusable, False
        if keep:
            try:
                keep = builder.return_to_pool(
                    owner=self.worker, limit=self.options.openstack_pool, lock=self._pool_lock
                )
            except CloudbuildError as exc:
                log.warning("could not return the builder to the pool, deleting it", error=str(exc))
                keep = False
        if not keep:
            builder.delete()

    def cleanup(self) -> None:
        super().cleanup()
        if self._own_api and self._api is not None:
            self._api.close()  # a later call (kill, another build) connects again
            self._api = None
