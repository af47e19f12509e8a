"""`cloudbuild kill`: stop a running build so that nothing of it is extracted (obs-build's --kill).

    cloudbuild kill --vm-type TYPE --build-id ID [--root DIR] [the build's disk/worker options]

The build is found the way `cloudbuild build` laid it out: its work folder is `--root DIR`, or
`$TMPDIR/cloudbuild-ID-*` (default TMPDIR /var/tmp). Then, for every backend:

1. the swap volume is marked `BUILDSTATUS1` while the machine may still run, so the build reports
   "failed" and extracts nothing (obs-build does the same);
2. the machine is stopped by the backend's `kill()` (fuser -k for qemu/uml/emulator, lxc-stop,
   xl destroy, vmcp force, the chroot's processes, a cloud instance's termination);
   A marker file in the work folder tells the build that the end of its machine was a kill,
   not a crash, so it reads the swap's status (exit 1) instead of reporting exit 3.
3. the swap is marked again once the machine is gone (a guest that finished in between may have
   written its own status; a z/VM minidisk can only be linked here now).

Backends without swap (chroot, lxc) record the kill in the build's work folder instead, and the
build reports it as failed. Killing what is not running is not an error: exit 0.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cloudbuild import log as cblog
from cloudbuild import options as cboptions
from cloudbuild.backend import Backend, BuildSlot, create_backend, mark_killed
from cloudbuild.disk import buildstatus
from cloudbuild.errors import CloudbuildError, UsageError
from cloudbuild.volume import Volume

log = cblog.get_logger(__name__)

USAGE = "usage: cloudbuild kill --vm-type TYPE --build-id ID [--root DIR] [the build's vm options]"
KILLED_STATUS = 1


def work_folders(options: cboptions.VmOptions, build_id: str) -> list[Path]:
    """Where `cloudbuild build` keeps this build's files (see commands/build.py `_workdir`)."""
    if options.root:
        return [Path(options.root)]
    base = os.environ.get("TMPDIR", "/var/tmp")
    pattern = os.path.join(glob.escape(base), f"cloudbuild-{glob.escape(build_id)}-*")
    return sorted(Path(p) for p in glob.glob(pattern) if os.path.isdir(p))


def _local_path(volume: Volume) -> Path | None:
    """The swap's path when it is a file or device right here (no attach needed), else None."""
    path = volume.local_path
    if path is not None and path.exists() and not path.is_dir():
        return path
    return None


def mark_swap(volume: Volume, *, attach: bool) -> bool:
    """Write BUILDSTATUS1 on the swap; with `attach`, attach it here first if it is not local."""
    path = _local_path(volume)
    if path is not None:
        buildstatus.write(path, KILLED_STATUS)
        return True
    if not attach:
        return False
    device = volume.attach()
    if device is None:
        return False
    try:
        buildstatus.write(device, KILLED_STATUS)
    finally:
        volume.detach()
    return True


def kill_slot(backend: Backend, slot: BuildSlot) -> None:
    pair = backend.volumes(slot)
    if pair.swap is not None:
        mark_swap(pair.swap, attach=False)
    # tells the build process that its machine was stopped on purpose (KILLED, not a crash)
    mark_killed(slot.workdir)
    backend.kill()
    if pair.swap is not None:
        try:
            mark_swap(pair.swap, attach=True)
        except (CloudbuildError, OSError) as exc:
            log.warning("could not mark the swap after the kill", swap=pair.swap.id, error=str(exc))
    log.info("killed", build=slot.build_id, vm_type=backend.name, workdir=str(slot.workdir))


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if any(a in ("-h", "--help", "-help") for a in args):
        print(cboptions.help_text(USAGE))
        return 0
    options = cboptions.resolve_paths(cboptions.parse(args))
    cblog.configure(options.log_format)  # type: ignore[arg-type]
    build_id = options.build_id or (options.positionals[0] if len(options.positionals) == 1 else None)
    if not build_id or options.positionals[1:]:
        raise UsageError(f"which build? give --build-id ID\n{USAGE}")
    folders = work_folders(options, build_id)
    if not folders:
        print(f"cloudbuild kill: no build {build_id} is running", file=sys.stderr)
        return 0
    backend = create_backend(options)
    for folder in folders:
        kill_slot(backend, BuildSlot(build_id, 0, folder))
    print(f"cloudbuild kill: build {build_id} killed", file=sys.stderr)
    return 0
