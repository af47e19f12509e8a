"""The initramfs that boots a build machine: busybox, kernel modules, python3 and the guest agent.

Contents (built on the fly from the host, cached by kernel + modules + agent source + tools):

    /init                       busybox sh: mount proc/sys/dev, insmod, /dev/disk/by-id links,
                                exec python3 -m cloudbuild.guest.agent (as PID 1)
    /bin/busybox + applets      mount, mkswap, swapon, swapoff, ip, poweroff, ... for the agent
    /lib/modules/NN-name.ko     virtio + the root filesystem's modules, decompressed, load order
    /usr/bin/python3, its libs  the host's interpreter and the shared libraries ldd names
    /usr/lib/python3.X/...      only the stdlib modules the agent imports (found by importing it)
    /lib/cloudbuild/cloudbuild  the agent (cloudbuild.guest + buildstatus, blocklist, builddata)

The build root itself needs nothing but /bin/sh: the agent brings its own runtime.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cloudbuild
from cloudbuild.disk.mkfs import filesystem
from cloudbuild.errors import HostBroken
from cloudbuild.log import get_logger
from cloudbuild.runner import CommandError, run, which
from local_backends import kmod
from local_backends.cpio import CpioWriter
from local_backends.kernel import cache_dir

log = get_logger(__name__)

FORMAT = "cloudbuild-initramfs-1"
VIRTIO_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
)
AGENT_ROOT = "/lib/cloudbuild"
# the cloudbuild modules the agent needs in the guest (each must be stdlib only)
AGENT_MODULES = (
    "cloudbuild.guest.agent",
    "cloudbuild.guest.sysops",
    "cloudbuild.guest.stats",
    "cloudbuild.guest.personality",  # imported only for a build under linux32 (it needs ctypes)
    "cloudbuild.disk.buildstatus",
    "cloudbuild.disk.blocklist",
    "cloudbuild.buildroot.builddata",
)
# imported lazily by the interpreter (decoding file names, the console) rather than by the agent
EXTRA_STDLIB = ("encodings.ascii", "encodings.latin_1", "encodings.utf_8", "encodings.aliases")
BUSYBOX_APPLETS = (
    "sh", "mount", "umount", "mkdir", "ln", "cat", "insmod", "mkswap", "swapon", "swapoff",
    "ip", "ifconfig", "poweroff", "reboot", "sync", "ls", "echo", "sleep", "hostname",
)  # fmt: skip

INIT_SCRIPT = """#!/bin/sh
# cloudbuild initramfs: load the disk drivers, name the disks by serial, start the agent as PID 1
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read module; do
    insmod "/lib/modules/$module" || echo "cloudbuild init: insmod $module failed"
done < /etc/cloudbuild/modules
# appended to a given initrd (agentroot.with_agent): its modules, by its own modprobe
test -s /etc/cloudbuild/modprobe && modprobe -a $(cat /etc/cloudbuild/modprobe)
# no udev here: the links obs-build's kvm guests find their disks by (serial=0 root, serial=1 swap)
mkdir -p /dev/disk/by-id
for disk in /sys/block/vd*; do
    test -r "$disk/serial" || continue
    serial=$(cat "$disk/serial")
    test -n "$serial" && ln -sf "../../${disk##*/}" "/dev/disk/by-id/virtio-$serial"
done
exec /usr/bin/python3 -I -S -B -c \
    'import sys; sys.path.insert(0, "/lib/cloudbuild"); from cloudbuild.guest.agent import main; sys.exit(main())'
"""

_PROBE = """
import os, sys
sys.path.insert(0, sys.argv[1])
import importlib
for name in sys.argv[2:]:
    importlib.import_module(name)
files = {name: getattr(m, "__file__", None) for name, m in list(sys.modules.items())}
import json
print(json.dumps({"stdlib": os.path.dirname(os.__file__), "prefix": sys.prefix,
                  "version": "%d.%d" % sys.version_info[:2], "files": files}))
"""


@dataclass(frozen=True)
class Tools:
    python: Path
    busybox: Path


def guest_python() -> Path:
    """The interpreter to pack: $CLOUDBUILD_GUEST_PYTHON, the distribution's python3, else ours."""
    configured = os.environ.get("CLOUDBUILD_GUEST_PYTHON")
    if configured:
        return Path(configured)
    for candidate in (Path("/usr/bin/python3"), Path(sys.executable)):
        if candidate.exists():
            return candidate.resolve()
    raise HostBroken("no python3 to run the guest agent with")


def find_tools() -> Tools:
    busybox = which("busybox")
    if busybox is None:
        raise HostBroken("busybox not found: install busybox-static (it is the initramfs' shell)")
    return Tools(python=guest_python(), busybox=busybox.resolve())


def _source_dir() -> Path:
    """The folder that holds the `cloudbuild` package (the agent is packed from there)."""
    return Path(cloudbuild.__file__).resolve().parent.parent


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def cache_key(release: str, module_files: Sequence[Path], tools: Tools) -> str:
    digest = hashlib.sha256()
    digest.update(f"{FORMAT}\n{release}\n{INIT_SCRIPT}\n".encode())
    for path in module_files:
        digest.update(_stat_key(path).encode() + b"\n")
    for tool in (tools.python, tools.busybox):
        digest.update(_stat_key(tool).encode() + b"\n")
    package = _source_dir() / "cloudbuild"
    for sub in ("__init__.py", "guest", "disk", "buildroot"):
        for path in sorted((package / sub).rglob("*.py")) if (package / sub).is_dir() else [package / sub]:
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:20]


def module_list(filesystem_name: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The modules a build machine needs: virtio disks plus the root filesystem's (disk/mkfs.py)."""
    return (*VIRTIO_MODULES, *filesystem(filesystem_name).kernel_modules, *extra)


def _probe_python(python: Path) -> tuple[dict[str, str], str, str]:
    """Import the agent with the guest interpreter; return (module files, stdlib dir, X.Y version)."""
    try:
        proc = run(
            [python, "-I", "-S", "-c", _PROBE, _source_dir(), *AGENT_MODULES, *EXTRA_STDLIB], timeout=60
        )
    except CommandError as exc:
        raise HostBroken(f"the guest agent does not import on {python}: {exc}") from exc
    info = json.loads(proc.stdout)
    files = {name: path for name, path in info["files"].items() if path}
    return files, info["stdlib"], info["version"]


def _shared_libraries(paths: Iterable[Path]) -> set[Path]:
    """What the dynamic loader needs for `paths` (ldd), the loader itself included."""
    libs: set[Path] = set()
    for path in paths:
        proc = run(["ldd", path], check=False, timeout=30)
        if proc.returncode != 0:
            continue  # static or not a dynamic object
        for line in proc.stdout.splitlines():
            words = line.split()
            if "=>" in words:
                target = words[words.index("=>") + 1]
                if target.startswith("/"):
                    libs.add(Path(target))
            elif words and words[0].startswith("/"):
                libs.add(Path(words[0]))
    return libs


def _write_tree(cpio: CpioWriter, staging: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(staging):
        dirnames.sort()
        rel = os.path.relpath(dirpath, staging)
        if rel != ".":
            cpio.directory(rel)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            arcname = name if rel == "." else f"{rel}/{name}"
            if path.is_symlink():
                cpio.symlink(arcname, os.readlink(path))
                continue
            st = path.stat()
            cpio.file(arcname, path.read_bytes(), st.st_mode & 0o7777, mtime=int(st.st_mtime))


def _stage_python(staging: Path, tools: Tools) -> None:
    files, stdlib, version = _probe_python(tools.python)
    source = _source_dir()
    package_root = staging / AGENT_ROOT.lstrip("/")
    stdlib_dir = Path(stdlib)
    extensions: list[Path] = []
    for name, file in sorted(files.items()):
        path = Path(file)
        if path.is_relative_to(source / "cloudbuild"):
            target = package_root / path.relative_to(source)
        elif path.is_relative_to(stdlib_dir) and "site-packages" not in path.parts:
            target = staging / stdlib_dir.relative_to("/") / path.relative_to(stdlib_dir)
            if path.suffix == ".so":
                extensions.append(path)
        else:
            raise HostBroken(f"the guest agent imports {name} from {path}: not stdlib, cannot pack it")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    # the interpreter finds its prefix by these landmarks; lib-dynload may stay empty
    landmark = staging / stdlib_dir.relative_to("/") / "os.py"
    if not landmark.exists():
        landmark.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(stdlib_dir / "os.py", landmark)
    (staging / stdlib_dir.relative_to("/") / "lib-dynload").mkdir(parents=True, exist_ok=True)
    # packages the probe imported only partly still need their __init__ files
    for init in package_root.rglob("*"):
        if init.is_dir() and not (init / "__init__.py").exists():
            (init / "__init__.py").write_text("")
    # precompiled, hash-checked-never: compiling under TCG at every boot costs seconds
    run(
        [tools.python, "-I", "-S", "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash",
         "-s", staging, "-p", "/", staging],
        timeout=300,
    )  # fmt: skip
    python_target = staging / "usr/bin/python3"
    python_target.parent.mkdir(parents=True, exist_ok=True)
    if tools.python.parent == Path("/usr/bin"):
        shutil.copy2(tools.python, python_target)
    else:  # e.g. a pyenv build: its prefix is found from its real path, /usr/bin/python3 links there
        own = staging / tools.python.relative_to("/")
        own.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tools.python, own)
        python_target.symlink_to(tools.python)
    for lib in _shared_libraries([tools.python, *extensions]):
        target = staging / lib.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lib.resolve(), target)
        target.chmod(0o755)
    log.debug("packed python", python=str(tools.python), version=version, modules=len(files))


def build_initramfs(
    release: str,
    modules_dir: Path,
    modules: Sequence[str],
    *,
    tools: Tools | None = None,
    cache: Path | None = None,
) -> Path:
    """The initramfs for kernel `release` with `modules` (+ dependencies); built once, then cached."""
    tools = tools or find_tools()
    index = kmod.ModuleIndex.load(modules_dir)
    ordered = index.resolve(list(modules))
    module_files = [modules_dir / rel for rel in ordered]
    key = cache_key(release, module_files, tools)
    folder = (cache or cache_dir()) / "initramfs"
    target = folder / f"initramfs-{release}-{key}.cpio"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="initramfs-", dir=folder) as tmp:
        staging = Path(tmp) / "root"
        staging.mkdir()
        _stage_python(staging, tools)
        archive = Path(tmp) / "initramfs.cpio"
        with open(archive, "wb") as out:
            cpio = CpioWriter(out)
            for folder_name in ("dev", "proc", "sys", "mnt", "tmp", "run", "etc/cloudbuild", "lib/modules"):
                cpio.directory(folder_name)
            cpio.char_device("dev/console", 5, 1)
            cpio.char_device("dev/null", 1, 3, 0o666)
            cpio.file("init", INIT_SCRIPT.encode(), 0o755)
            cpio.file("bin/busybox", tools.busybox.read_bytes(), 0o755)
            for applet in BUSYBOX_APPLETS:
                cpio.symlink(f"bin/{applet}", "busybox")
            names: list[str] = []
            for number, (rel, path) in enumerate(zip(ordered, module_files, strict=True)):
                name = f"{number:02d}-{kmod.module_name(rel)}.ko"
                cpio.file(f"lib/modules/{name}", kmod.module_bytes(path))
                names.append(name)
            cpio.file("etc/cloudbuild/modules", "".join(f"{n}\n" for n in names).encode())
            _write_tree(cpio, staging)
            cpio.close()
        os.replace(archive, target)
    log.info("built initramfs", initramfs=str(target), release=release, modules=len(ordered))
    prune(folder)
    return target


def prune(folder: Path, *, keep: int = 8, min_age: float = 3600.0) -> None:
    """Remove old initramfs files (every agent change makes a new one), never one used recently:
    a build resolves its initramfs before it boots it."""
    files = sorted(folder.glob("initramfs-*.cpio"), key=lambda p: p.stat().st_mtime, reverse=True)
    now = time.time()
    for old in files[keep:]:
        try:
            if now - max(old.stat().st_mtime, old.stat().st_atime) > min_age:
                old.unlink()
        except OSError:
            pass  # another build pruned it first
