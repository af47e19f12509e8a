"""The guest agent's runtime for machines that are not qemu: uml and lxc.

Both reuse the initramfs of `local_backends/initramfs.py` (busybox, the host's python3, the agent):
- uml boots it as its `initrd=` exactly as qemu does, only without kernel modules (everything the
  UML kernel needs is built in): `agent_initramfs()`;
- lxc runs it unpacked, as the container's (read-only) root file system, with the build root bound
  at /mnt/buildroot, where the agent chroots the recipe: `agent_tree()`. The tree also gets
  `run-agent.py`, which starts the agent and records its status in /run/cloudbuild/status, a
  host folder the recipe never sees (it is chrooted into the build root);
- a given `--vm-initrd` gets the agent's initramfs appended (the kernel unpacks concatenated
  archives, later files win): our /init starts the agent, after loading the disk and filesystem
  drivers with the initrd's own modprobe: `with_agent()`;
- an emulator boots the build root's own /sbin/init (obs-build links it to /.build/build): the
  tree is copied to /.build/agent and /sbin/init links to its `init`, which binds the build root
  into the tree and starts the agent there as PID 1: `install_init()`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from pathlib import Path

from cloudbuild.errors import HostBroken, InfraError, UsageError
from cloudbuild.log import get_logger
from cloudbuild.runner import CommandError, run, which
from local_backends.initramfs import AGENT_ROOT, build_initramfs
from local_backends.kernel import cache_dir

log = get_logger(__name__)

STATUS_DIR = "/run/cloudbuild"
STATUS_FILE = "status"
BUILDROOT_MOUNT = "/mnt/buildroot"

RUN_AGENT = f"""# started by the container as its init: the agent, then its status for the host
import sys
sys.path.insert(0, {AGENT_ROOT!r})
from cloudbuild.guest.agent import main
status = main()
try:
    with open({STATUS_DIR + "/" + STATUS_FILE!r}, "w") as f:
        f.write("%d\\n" % status)
except OSError as exc:
    print("cloudbuild: cannot record the status: %s" % exc)
sys.exit(status)
"""


EMULATED_AGENT = "/.build/agent"
EMULATED_INIT = f"""#!{EMULATED_AGENT}/bin/busybox sh
# /sbin/init of a build root booted by an emulator: the agent runs from its own runtime (python
# and busybox of the worker host), with the build root bound where it chroots the recipe
export PATH=/bin:/sbin:/usr/bin
A={EMULATED_AGENT}
B="$A/bin/busybox"
$B mount -t proc proc "$A/proc"
$B mount -t sysfs sysfs "$A/sys"
$B mount -t devtmpfs devtmpfs "$A/dev"
$B mount --bind / "$A{BUILDROOT_MOUNT}"
exec $B chroot "$A" /usr/bin/python3 -I -S -B {AGENT_ROOT}/run-agent.py --root-dir {BUILDROOT_MOUNT}
"""


def install_init(buildroot: Path) -> None:
    """The agent as the build root's /sbin/init (obs-build's emulator fixup, with our agent)."""
    target = buildroot / EMULATED_AGENT.lstrip("/")
    shutil.rmtree(target, ignore_errors=True)
    try:
        run(["cp", "-a", "--", f"{agent_tree()}/.", f"{target}/"], timeout=300)
    except CommandError as exc:
        raise InfraError(f"cannot copy the agent into the build root: {exc}") from exc
    (target / "init").write_text(EMULATED_INIT)
    (target / "init").chmod(0o755)
    sbin = _inside(buildroot, "sbin")
    sbin.mkdir(parents=True, exist_ok=True)
    init = sbin / "init"
    if init.is_symlink() or init.exists():
        init.unlink()
    init.symlink_to(f"{EMULATED_AGENT}/init")


def _inside(buildroot: Path, name: str) -> Path:
    """`buildroot/name` with a symlink there (usr-merge: /sbin -> usr/sbin) resolved inside the root."""
    path = buildroot / name
    if not path.is_symlink():
        return path
    link = os.readlink(path)
    resolved = Path(
        os.path.normpath(buildroot / link.lstrip("/") if link.startswith("/") else path.parent / link)
    )
    if resolved.is_symlink() or not resolved.is_relative_to(buildroot):
        raise UsageError(f"--rootfs: /{name} links to {link!r}, which leaves the build root or links again")
    return resolved


def with_agent(initrd: Path, filesystem_name: str) -> Path:
    """`initrd` + the agent's initramfs (+ the modules to modprobe), cached by their contents.

    The kernel unpacks a directory entry over a symlink of an earlier archive by replacing the
    link, so our entries go *through* the given initrd's top-level links (merged /usr: bin ->
    usr/bin, lib -> usr/lib): its own modules and tools stay where its links say they are.
    """
    from local_backends.cpio import CpioWriter, Entry, read_entries
    from local_backends.initramfs import module_list
    from local_backends.initrd import decompressed

    agent = agent_initramfs()
    given = initrd.read_bytes()
    modprobe = " ".join(module_list(filesystem_name)) + "\n"
    digest = hashlib.sha256(given + agent.name.encode() + modprobe.encode()).hexdigest()[:20]
    target = agent.parent / f"initramfs-given-{digest}.cpio"
    if target.exists():
        return target
    links = {
        e.name: e.data.decode("utf-8", "replace")
        for e in read_entries(decompressed(given, str(initrd)))
        if stat.S_ISLNK(e.mode) and "/" not in e.name and ".." not in e.data.decode("utf-8", "replace")
    }
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            out.write(given)
            out.write(b"\0" * (-len(given) % 4))  # an uncompressed archive starts 4-byte aligned
            cpio = CpioWriter(out)
            for entry in read_entries(agent.read_bytes()):
                top, _, rest = entry.name.partition("/")
                if top in links and not rest:
                    continue  # their link stays
                name = f"{links[top].strip('/')}/{rest}" if top in links else entry.name
                cpio.entry(Entry(name, entry.mode, entry.data, entry.rdev, entry.mtime))
            cpio.file("etc/cloudbuild/modprobe", modprobe.encode())
            cpio.close()
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("appended the agent to the given initrd", initrd=str(initrd), initramfs=str(target))
    return target


def _no_modules() -> Path:
    """An empty module folder: the machines here load no kernel modules."""
    folder = cache_dir() / "no-modules"
    folder.mkdir(parents=True, exist_ok=True)
    dep = folder / "modules.dep"
    if not dep.exists():
        dep.write_text("")
    return folder


def agent_initramfs() -> Path:
    """The agent's initramfs without kernel modules (cached by `build_initramfs`)."""
    return build_initramfs("agent", _no_modules(), ())


def agent_tree() -> Path:
    """The agent's initramfs unpacked into a folder (cached next to it, built once per initramfs)."""
    archive = agent_initramfs()
    target = archive.parent / f"{archive.stem}.tree"
    if (target / "lib" / "cloudbuild" / "run-agent.py").exists():
        return target
    busybox = which("busybox")
    if busybox is None:
        raise HostBroken("busybox not found: install busybox-static")
    tmp = Path(tempfile.mkdtemp(prefix=".tree-", dir=archive.parent))
    try:
        try:
            run(
                [busybox, "cpio", "-i", "-d", "-m"],
                input=archive.read_bytes(),
                text=False,
                cwd=tmp,
                timeout=120,
            )
        except CommandError as exc:
            raise HostBroken(f"cannot unpack the agent's initramfs {archive}: {exc}") from exc
        (tmp / BUILDROOT_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (tmp / STATUS_DIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (tmp / AGENT_ROOT.lstrip("/") / "run-agent.py").write_text(RUN_AGENT)
        os.rename(tmp, target)
    except FileExistsError:
        shutil.rmtree(tmp, ignore_errors=True)  # another build unpacked it at the same time
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == 39:  # ENOTEMPTY: another build won the rename
            return target
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("unpacked the agent's runtime", tree=str(target))
    return target


def read_status(folder: Path) -> int | None:
    """The status the agent recorded (one digit), None when it recorded none."""
    path = folder / STATUS_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        text = os.read(fd, 16)
    finally:
        os.close(fd)
    value = text.strip()
    return int(value) if len(value) == 1 and value.isdigit() else None
