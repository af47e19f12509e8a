"""Volume: one disk of a build machine and its lifecycle, the same for clouds and local hypervisors.

A build slot has a root and a swap volume (`VolumePair`). The orchestrator attaches them to
this worker to prepare the root and to read status and results, and hands them to the build
machine in between. Kinds: EbsVolume (cloud/ec2.py), CinderVolume (cloud/openstack.py), and
the local kinds in local_backends/ (image file, block device, z/VM minidisk).

Contract every kind keeps:
- `attach()` / `detach()` are idempotent and wait (with a deadline) until the state is reached;
  `attach()` returns the real device node (or image file) on this host, never a guessed name.
- `delete()` is idempotent; a volume the user supplied (`owned` False) is never deleted, only
  wiped before reuse (`wipe()`), so no build reads a previous build's residue.
- `tags` name the owner, build, slot and lease so a crashed worker's volumes can be swept.
"""

from __future__ import annotations

import abc
import contextlib
import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cloudbuild.deadline import Deadline


class Role(enum.StrEnum):
    ROOT = "root"
    SWAP = "swap"


class VolumeState(enum.StrEnum):
    ABSENT = "absent"  # not created yet, or deleted
    CREATING = "creating"
    AVAILABLE = "available"  # exists, attached nowhere
    ATTACHING = "attaching"
    ATTACHED = "attached"  # attached to this worker
    IN_USE = "in-use"  # attached to another machine (the builder)
    DETACHING = "detaching"
    ERROR = "error"


TAG_OWNER = "cloudbuild:owner"
TAG_BUILD = "cloudbuild:build"
TAG_SLOT = "cloudbuild:slot"
TAG_EXPIRES = "cloudbuild:expires"
TAG_GC_SEEN = "cloudbuild:gc-seen"
TAG_ROLE = "cloudbuild:role"


class Volume(abc.ABC):
    """One disk. Subclasses implement the primitive operations; see the module docstring."""

    def __init__(
        self, role: Role, size_mib: int, *, owned: bool = True, tags: Mapping[str, str] | None = None
    ):
        self.role = role
        self.size_mib = size_mib
        self.owned = owned  # created by us (delete after use) or supplied by the user (wipe, keep)
        self.tags: dict[str, str] = dict(tags or {})
        # the phase deadline of the create/attach/detach under way (`_within`): the waits of a
        # kind that waits pass it to `retry.wait_for`
        self._deadline: Deadline | None = None

    @property
    @abc.abstractmethod
    def id(self) -> str:
        """The volume's identity (cloud volume id, image path, minidisk address)."""

    # `deadline`: the phase's. Every wait inside ends by it too (`retry.wait_for(deadline=)`), so a
    # phase limit bites inside a slow create/attach/detach, not only after it returned; a wait cut
    # short by it raises `PhaseExpired` (slow, not stuck: no host health is charged). Kinds
    # without waits accept and ignore it.

    @abc.abstractmethod
    def create(self, *, deadline: Deadline | None = None) -> None:
        """Create the volume if it does not exist yet (no-op for supplied volumes that exist)."""

    @abc.abstractmethod
    def attach(self, host: str | None = None, *, deadline: Deadline | None = None) -> Path | None:
        """Attach to `host` (None: this worker) and wait; return the local device node when attached here."""

    @abc.abstractmethod
    def detach(self, *, deadline: Deadline | None = None) -> None:
        """Detach from wherever it is attached and wait until it is available; no-op when detached."""

    @abc.abstractmethod
    def delete(self) -> None:
        """Delete the volume; no-op when it is gone. Never called for volumes we do not own."""

    @abc.abstractmethod
    def state(self) -> VolumeState:
        """The current state as the backing store reports it."""

    @contextlib.contextmanager
    def _within(self, deadline: Deadline | None) -> Iterator[None]:
        """Make `deadline` the one every wait of this call ends by (an inner call without one
        keeps the outer call's)."""
        outer, self._deadline = self._deadline, deadline or self._deadline
        try:
            yield
        finally:
            self._deadline = outer

    @property
    def local_path(self) -> Path | None:
        """The volume's file or device right here, usable without an attach (a local image);
        None (the default) for a volume that must be attached first."""
        return None

    def wipe(self, device: Path) -> None:  # noqa: B027 - optional hook, default is "nothing to wipe"
        """Discard old contents of a reused volume while it is attached here at `device`."""

    def release(self) -> None:
        """End of the build: detach, then delete what we own. Safe to call in any state."""
        self.detach()
        if self.owned:
            self.delete()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.role.value}, {self.id})"


@dataclass
class VolumePair:
    """Root and swap of one build slot. Swap may be absent (emulator without swap, chroot)."""

    root: Volume
    swap: Volume | None = None

    def __iter__(self) -> Iterator[Volume]:
        yield self.root
        if self.swap is not None:
            yield self.swap
