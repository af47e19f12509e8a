"""The builder server: created from the builder image with the build's volumes, watched until it
powers itself off, and deleted whatever happened.

The server boots the builder image (`--vm-kernel` names it, as obs-build's
`OBS_OPENSTACK_KERNEL_IMAGE_ID`); root and swap come as `block_device_mapping_v2` entries
(`delete_on_termination` false: the volumes belong to the build, not to the server). Its boot
hook is the user-data script `user_data()` writes: cloud-init runs it, it finds the volumes by
their virtio serial and runs the guest agent on them, which powers the server off when done.

With `--openstack-pool N` a builder that powered itself off is kept stopped and claimed by a later
build (`Builder.claim`, `Builder.return_to_pool`). Nova cannot replace a server's user data, so
the hook never carries volume ids: it reads them at every boot from the server's metadata
(`cloudbuild:root-volume`, `cloudbuild:swap-volume`), which the worker sets on create and claim.
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudbuild.backend import BootResult, Console, ExitReason
from cloudbuild.cloud.base import host_lock
from cloudbuild.cloud.common import TAG_POOL, format_time, lease_expiry, utcnow
from cloudbuild.cloud.openstack.api import CONSOLE_API, Api
from cloudbuild.cloud.openstack.console import ConsoleStream
from cloudbuild.cloud.openstack.devices import VIRTIO_SERIAL_LENGTH
from cloudbuild.errors import CloudbuildError, DeadlineExceeded, InfraError, UsageError
from cloudbuild.log import get_logger
from cloudbuild.retry import call_with_retries, wait_for
from cloudbuild.volume import TAG_BUILD, TAG_EXPIRES, TAG_OWNER

log = get_logger(__name__)

TAG_KILLED = "cloudbuild:killed"
"""Server metadata set by `cloudbuild kill` from another process before it stops the builder."""
UNLIMITED = 30 * 24 * 3600.0  # "no build timeout" still needs a number for the waiter
GUEST_PYTHONPATH = "/usr/lib/cloudbuild"
TAG_ROOT_VOLUME = "cloudbuild:root-volume"
TAG_SWAP_VOLUME = "cloudbuild:swap-volume"
"""Server metadata: the build's volume ids, which the boot hook reads at every boot."""
PER_BOOT_HOOK = "/var/lib/cloud/scripts/per-boot/cloudbuild-builder"
"""Where the hook installs itself on its first boot: cloud-init runs user data once per server,
scripts there at every boot (a pool builder boots once per build)."""

# Reads the volume ids from the config drive when there is one, else from the metadata service.
# Runs in the builder (python3 is there for the guest agent); prints "ROOT SWAP" or nothing.
_READ_VOLUME_IDS = f"""
import json, os, subprocess, sys, tempfile, time, urllib.request
def config_drive():
    label = "/dev/disk/by-label/config-2"
    if not os.path.exists(label):
        return None
    with tempfile.TemporaryDirectory() as mnt:
        if subprocess.run(["mount", "-o", "ro", label, mnt]).returncode != 0:
            return None
        try:
            with open(os.path.join(mnt, "openstack/latest/meta_data.json")) as f:
                return json.load(f)
        finally:
            subprocess.run(["umount", mnt])
def metadata_service():
    for _ in range(60):
        try:
            url = "http://169.254.169.254/openstack/latest/meta_data.json"
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.load(r)
        except OSError:
            time.sleep(2)
    return None
doc = config_drive() or metadata_service() or {{}}
meta = doc.get("meta") or {{}}
ids = [str(meta.get("{TAG_ROOT_VOLUME}", "")), str(meta.get("{TAG_SWAP_VOLUME}", ""))]
if all(i and i.replace("-", "").isalnum() for i in ids):
    print(*ids)
"""


def volume_metadata(root_id: str, swap_id: str) -> dict[str, str]:
    return {TAG_ROOT_VOLUME: root_id, TAG_SWAP_VOLUME: swap_id}


@dataclass(frozen=True)
class FlavorChoice:
    id: str
    name: str
    vcpus: int
    ram: int


def choose_flavor(flavors: list[Any], *, memory_mib: int | None, vcpus: int) -> FlavorChoice:
    """The smallest enabled flavor with at least `memory_mib` RAM and `vcpus` CPUs."""
    fits = [
        f
        for f in flavors
        if not getattr(f, "is_disabled", False)
        and int(getattr(f, "vcpus", 0) or 0) >= vcpus
        and int(getattr(f, "ram", 0) or 0) >= (memory_mib or 0)
    ]
    if not fits:
        want = f"{vcpus} vCPUs" + (f" and {memory_mib} MiB" if memory_mib else "")
        raise UsageError(
            f"no OpenStack flavor has {want} (--jobs/--vm-memory); choose one with --openstack-flavor"
        )
    best = min(fits, key=lambda f: (int(f.vcpus), int(f.ram), int(getattr(f, "disk", 0) or 0), str(f.name)))
    return FlavorChoice(str(best.id), str(best.name), int(best.vcpus), int(best.ram))


def user_data(*, fstype: str, mount_options: str, pythonpath: str = GUEST_PYTHONPATH) -> str:
    """The builder's boot hook: it runs at every boot, reads the build's volume ids from the
    server's metadata, and ends with the guest agent powering the server off."""
    short = VIRTIO_SERIAL_LENGTH
    names = " ".join(
        [
            f'"/dev/disk/by-id/virtio-$(printf %.{short}s "$1")"',
            '"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_$1"',
            f'"/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_$(printf %.{short}s "$1")"',
        ]
    )
    agent = ["--fstype", fstype] + (["--mount-options", mount_options] if mount_options else [])
    return "\n".join(
        [
            "#!/bin/sh",
            "# cloudbuild builder boot hook: read the build's volume ids from the server metadata,",
            "# find the volumes by serial, run the guest agent (which powers the server off)",
            f"hook={shlex.quote(PER_BOOT_HOOK)}",
            '[ "$0" = "$hook" ] || { mkdir -p "${hook%/*}" && cp "$0" "$hook" && chmod 755 "$hook"; }',
            "udevadm settle --timeout=120 2>/dev/null || true",
            f"ids=$(python3 -c {shlex.quote(_READ_VOLUME_IDS)})",
            "set -- $ids",
            '[ "$#" -eq 2 ] || { echo "cloudbuild: no volume ids in the server metadata"; poweroff -f; }',
            "root_id=$1 swap_id=$2",
            f'names() {{ for dev in {names}; do echo "$dev"; done; }}',
            'pick() { for dev in $(names "$1"); do [ -e "$dev" ] && { echo "$dev"; return 0; }; done; return 1; }',
            "root=$(pick \"$root_id\") || { echo 'cloudbuild: root volume not found'; poweroff -f; }",
            "swap=$(pick \"$swap_id\") || { echo 'cloudbuild: swap volume not found'; poweroff -f; }",
            f"export PYTHONPATH={shlex.quote(pythonpath)}${{PYTHONPATH:+:$PYTHONPATH}}",
            'exec python3 -m cloudbuild.guest.agent --root "$root" --swap "$swap" ' + shlex.join(agent),
            "",
        ]
    )


class Builder:
    """One builder server of one build (or none yet)."""

    def __init__(self, api: Api, *, name: str):
        self.api = api
        self.name = name
        self.id: str | None = None
        self.killed = False
        self.log = log.bind(server_name=name)

    @property
    def compute(self) -> Any:
        return self.api.conn.compute

    def create(
        self,
        *,
        image: str,
        flavor: str,
        network: str | None,
        volumes: list[str],
        metadata: Mapping[str, str],
        script: str,
    ) -> str:
        """Create the server (not waiting for it); a create whose answer was lost is adopted, not repeated."""
        bdm = [
            {
                "uuid": volume_id,
                "source_type": "volume",
                "destination_type": "volume",
                "boot_index": -1,
                "delete_on_termination": False,
            }
            for volume_id in volumes
        ]
        networks: Any = [{"uuid": network}] if network else "none"
        attempts = 0

        def find_or_create() -> str:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                existing = self._find_by_name(metadata.get(TAG_OWNER))
                if existing is not None:
                    return existing
            server = self.compute.create_server(
                name=self.name,
                image_id=image,
                flavor_id=flavor,
                networks=networks,
                block_device_mapping_v2=bdm,
                metadata=dict(metadata),
                user_data=base64.b64encode(script.encode()).decode(),
            )
            return str(server.id)

        self.id = self.api.call(f"create builder server {self.name}", find_or_create)
        self.log = self.log.bind(server=self.id)
        self.log.info("builder server created", image=image, flavor=flavor, volumes=volumes)
        return self.id

    # -- the warm pool (--openstack-pool) ----------------------------------------------------------
    def claim(self, *, owner: str, image: str, metadata: Mapping[str, str], lock: Path) -> bool:
        """Take a stopped, idle builder of `owner`'s pool for this build: tag it with the build
        and its volume ids (its boot hook reads those). False when the pool has none."""
        compute = self.compute
        with host_lock(lock):
            servers = self.api.call("list pool servers", lambda: list(compute.servers(details=True)))
            free = sorted(
                str(s.id)
                for s in servers
                if (s.metadata or {}).get(TAG_POOL) == owner
                and not (s.metadata or {}).get(TAG_BUILD)
                and s.status == "SHUTOFF"
                and _image_id(s) == image
            )
            if not free:
                return False
            server_id = free[0]
            self.api.call(
                f"claim pool server {server_id}",
                lambda: compute.set_server_metadata(server_id, **dict(metadata)),
            )
        self.id = server_id
        self.log = self.log.bind(server=server_id)
        self.log.info("builder claimed from the pool")
        return True

    def start(self) -> None:
        """Boot a claimed builder (its volumes are attached already)."""
        server_id = self.id
        self.api.call(f"start server {server_id}", lambda: self.compute.start_server(server_id))
        self.log.info("pool builder starting")

    def return_to_pool(self, *, owner: str, limit: int, lock: Path) -> bool:
        """Tag the stopped builder (volumes detached already) as an idle member of `owner`'s pool,
        with a renewed lease; False when the pool is full (the caller deletes it)."""
        server_id = self.id
        compute = self.compute
        with host_lock(lock):
            servers = self.api.call("list pool servers", lambda: list(compute.servers(details=True)))
            members = [
                s
                for s in servers
                if (s.metadata or {}).get(TAG_POOL) == owner and s.status not in ("DELETED", "SOFT_DELETED")
            ]
            if len(members) > limit:
                return False
            idle = {TAG_BUILD: "", TAG_EXPIRES: format_time(lease_expiry(None))}
            self.api.call(
                f"return server {server_id} to the pool",
                lambda: compute.set_server_metadata(server_id, **idle),
            )
            stale = [TAG_ROOT_VOLUME, TAG_SWAP_VOLUME]
            self.api.find(
                f"forget the volumes of server {server_id}",
                lambda: compute.delete_server_metadata(server_id, stale),
            )
        self.log.info("builder returned to the pool", pool_size=len(members))
        self.id = None
        return True

    def _find_by_name(self, owner: str | None) -> str | None:
        """Our server of this name (another worker may run a build of the same id)."""
        for server in self.compute.servers(name=f"^{re.escape(self.name)}$"):
            if server.name == self.name and (server.metadata or {}).get(TAG_OWNER) == owner:
                return str(server.id)
        return None

    def _console(self, length: int | None) -> str:
        server_id = self.id
        reply = self.api.call(
            f"console of server {server_id}",
            lambda: self.compute.get_server_console_output(server_id, length=length),
            policy=CONSOLE_API,
        )
        output = reply.get("output") if isinstance(reply, dict) else None
        return output if isinstance(output, str) else ""

    def run(
        self,
        *,
        timeout: float | None,
        console: Console,
        killed: Callable[[], bool] = lambda: False,
        skip_earlier_console: bool = False,
    ) -> BootResult:
        """Stream the console until the server powers off, fails, vanishes or the deadline passes.

        `killed()`: whether `cloudbuild kill` was here (the backend's kill marker); a server that
        ends while it says so was killed, not lost. `skip_earlier_console`: a pool builder's
        console still holds its earlier builds' output, which is not this build's log.
        """

        def was_killed() -> bool:
            return self.killed or killed()

        if self.id is None:
            raise InfraError("builder server not created")
        server_id = self.id
        stream = ConsoleStream(self._console, _Discard() if skip_earlier_console else console)
        if skip_earlier_console:
            stream.poll()  # the earlier builds' lines: seen, never passed on
            stream.sink, stream.bytes = console, 0
        t = self.api.timeouts

        def poll_console(final: bool) -> None:
            try:
                if final:  # the last chance to read it: the server is deleted next
                    call_with_retries(
                        stream.flush,
                        is_transient=lambda exc: isinstance(exc, CloudbuildError),
                        what="final console output",
                        policy=CONSOLE_API,
                    )
                else:
                    stream.poll()
            except CloudbuildError as exc:  # the log is precious but never worth failing the build
                self.log.warning("console output unavailable", error=str(exc))

        def probe() -> BootResult | None:
            server = self.api.find(f"get server {server_id}", lambda: self.compute.get_server(server_id))
            if server is None or server.status in ("DELETED", "SOFT_DELETED"):
                if was_killed():
                    return BootResult(ExitReason.KILLED, detail="killed")
                return BootResult(ExitReason.CRASHED, detail=f"builder server {server_id} disappeared")
            status = str(server.status)
            if status == "ERROR":
                fault = server.fault if isinstance(server.fault, dict) else {}
                message = str(fault.get("message") or "no fault message")[:300]
                return BootResult(
                    ExitReason.CRASHED, detail=f"builder server {server_id} in ERROR: {message}"
                )
            if status == "SHUTOFF" and server.task_state:
                return None  # a claimed pool builder still powering on (Nova sets this at os-start)
            if status == "SHUTOFF":
                poll_console(final=True)
                if was_killed() or TAG_KILLED in (server.metadata or {}):
                    return BootResult(ExitReason.KILLED, detail="stopped by cloudbuild kill")
                return BootResult(ExitReason.POWERED_OFF)
            if status != "BUILD":
                poll_console(final=False)
            return None

        seconds = timeout if timeout is not None else UNLIMITED
        try:
            result = wait_for(
                probe,
                what=f"builder server {server_id} to power off",
                timeout=seconds,
                interval=t.console,
                max_interval=t.console,
            )
        except DeadlineExceeded:
            poll_console(final=True)
            self.log.warning("build deadline passed, killing the builder", timeout=seconds)
            self.kill()
            return BootResult(ExitReason.TIMEOUT, detail=f"the build ran past its deadline of {seconds:g}s")
        self.log.info(
            "builder stopped", reason=result.reason.value, detail=result.detail, console_bytes=stream.bytes
        )
        return result

    def stop_killed(self) -> None:
        """`cloudbuild kill` from another process: mark the server killed and power it off.

        The build's own process sees the server stop with the mark, reports the build killed
        (failed, nothing extracted) and deletes the server as after any build.
        """
        if self.id is None:
            return
        server_id = self.id
        self.log.info("killing builder server: marking and stopping it")
        mark = {TAG_KILLED: format_time(utcnow())}
        self.api.find(
            f"mark server {server_id} killed", lambda: self.compute.set_server_metadata(server_id, **mark)
        )
        try:
            self.api.find(f"stop server {server_id}", lambda: self.compute.stop_server(server_id))
        except InfraError as exc:  # already stopping or stopped: the mark is what counts
            self.log.info("builder server not stopped", error=str(exc))

    def kill(self) -> None:
        """Delete the server without waiting; idempotent."""
        self.killed = True
        if self.id is None:
            return
        server_id = self.id
        self.log.info("deleting builder server")
        self.api.find(f"delete server {server_id}", lambda: self.compute.delete_server(server_id))

    def delete(self) -> None:
        """Delete the server and wait until it is gone (its volumes are then being released)."""
        if self.id is None:
            return
        server_id = self.id
        self.kill()
        t = self.api.timeouts

        def gone() -> bool:
            server = self.api.find(f"get server {server_id}", lambda: self.compute.get_server(server_id))
            return server is None

        wait_for(
            gone,
            what=f"builder server {server_id} deleted",
            timeout=t.delete,
            interval=t.poll,
            max_interval=t.poll_max,
        )
        self.log.info("builder server deleted")
        self.id = None


class _Discard:
    def write(self, data: bytes) -> None:
        pass


def _image_id(server: Any) -> str | None:
    image = getattr(server, "image", None)
    if isinstance(image, Mapping):
        return str(image.get("id")) if image.get("id") else None
    return str(getattr(image, "id", None) or "") or None
