"""`--vm-type lxc`: the build runs in an LXC container (LXC 4/5 configuration keys).

obs-build's lxc mode makes the build root the container's root and starts its own script in it.
Our agent needs python, which a build root does not have to contain, so the container's root is
the agent's runtime (`agentroot.agent_tree()`: busybox, the host's python3, the agent; mounted
read-only) and the build root is bound at /mnt/buildroot, where the agent chroots the recipe,
exactly as it does in a VM. LXC itself mounts /proc, /sys (read-only) and a private /dev into the
build root, so the agent finds them in place. A host folder bound at /run/cloudbuild receives the
agent's status; the recipe, chrooted into the build root, cannot see it.

Never power off or touch /proc/sysrq-trigger in a container: the agent runs with `--no-poweroff`
(and sees `container=lxc`), and the container drops CAP_SYS_BOOT anyway.

Container names are `cloudbuild-<build id>` under a private lxcpath in the build's workdir, so
`cloudbuild kill` (`lxc-stop -k`) finds them and nothing is left in /var/lib/lxc.
"""

from __future__ import annotations

from pathlib import Path

from cloudbuild.backend import BootResult, BuildSlot, Console, register
from cloudbuild.errors import HostBroken, InfraError, UsageError
from cloudbuild.log import get_logger
from cloudbuild.runner import run, terminate, which
from cloudbuild.volume import VolumePair
from local_backends import agentroot
from local_backends.machines.directory import DirectoryBackend, check_mount_target

log = get_logger(__name__)

AGENT_CMD = "/usr/bin/python3 -S -B /lib/cloudbuild/run-agent.py --root-dir /mnt/buildroot --no-poweroff"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def _escape(path: Path) -> str:
    text = str(path)
    if any(c in text for c in " \t\n\\"):
        raise UsageError(
            f"lxc: the path {text!r} has white space or backslashes, which lxc.mount.entry cannot carry"
        )
    return text


def _cgroup_v2_only() -> bool:
    """A unified (v2) hierarchy without the v1 memory controller: LXC wants lxc.cgroup2.* keys there."""
    root = Path("/sys/fs/cgroup")
    return (root / "cgroup.controllers").exists() and not (root / "memory").is_dir()


def container_config(
    *, name: str, tree: Path, buildroot: Path, status_dir: Path, memory_mib: int | None
) -> str:
    """The LXC configuration of one build container."""
    inside = "mnt/buildroot"
    lines = [
        f"lxc.uts.name = {name[:63]}",
        f"lxc.rootfs.path = dir:{_escape(tree)}",
        "lxc.rootfs.options = ro",
        "lxc.mount.auto = proc:mixed sys:ro",
        "lxc.autodev = 1",
        f"lxc.mount.entry = {_escape(buildroot)} {inside} none bind,create=dir 0 0",
        f"lxc.mount.entry = proc {inside}/proc proc nosuid,nodev,noexec,create=dir 0 0",
        f"lxc.mount.entry = sysfs {inside}/sys sysfs ro,nosuid,nodev,noexec,create=dir 0 0",
        f"lxc.mount.entry = tmpfs {inside}/dev tmpfs mode=755,nosuid,create=dir 0 0",
        *(f"lxc.mount.entry = /dev/{d} {inside}/dev/{d} none bind,create=file 0 0" for d in DEVICES),
        f"lxc.mount.entry = devpts {inside}/dev/pts devpts newinstance,ptmxmode=0666,mode=0620,gid=5,create=dir 0 0",
        f"lxc.mount.entry = tmpfs {inside}/dev/shm tmpfs mode=1777,nosuid,nodev,create=dir 0 0",
        f"lxc.mount.entry = {_escape(status_dir)} run/cloudbuild none bind,create=dir 0 0",
        "lxc.net.0.type = empty",
        "lxc.console.path = none",
        "lxc.tty.max = 0",
        "lxc.pty.max = 16",
        "lxc.cap.drop = sys_boot sys_module sys_time sys_rawio mac_admin mac_override",
        "lxc.environment = container=lxc",
        f"lxc.init.cmd = {AGENT_CMD}",
    ]
    if memory_mib:
        if _cgroup_v2_only():
            lines.append(f"lxc.cgroup2.memory.max = {memory_mib}M")
        else:
            lines.append(f"lxc.cgroup.memory.limit_in_bytes = {memory_mib}M")
    return "\n".join(lines) + "\n"


@register
class LxcBackend(DirectoryBackend):
    name = "lxc"

    tree: Path | None = None

    @property
    def lxcpath(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "lxc"

    def container_name(self, slot_id: str) -> str:
        return f"cloudbuild-{slot_id}"

    def verify(self) -> None:
        for tool in ("lxc-start", "lxc-stop"):
            if which(tool) is None:
                raise HostBroken(f"--vm-type lxc: {tool} not found (install lxc)")
        self.tree = agentroot.agent_tree()

    def boot_and_wait(
        self, pair: VolumePair, slot: BuildSlot, *, timeout: float | None, console: Console
    ) -> BootResult:
        root = pair.root.attach()
        assert root is not None
        self.build_id = slot.build_id
        tree = self.tree or agentroot.agent_tree()
        for sub in ("proc", "sys", "dev"):
            check_mount_target(root, sub)
        status_dir = self.fresh_status_dir()
        self.lxcpath.mkdir(parents=True, exist_ok=True)
        name = self.container_name(slot.build_id)
        config = self.workdir / "lxc.conf" if self.workdir else None
        assert config is not None
        config.write_text(
            container_config(
                name=name, tree=tree, buildroot=root, status_dir=status_dir, memory_mib=self.options.vm_memory
            )
        )
        self._stop(name)  # a container of the same name left by a crashed run
        argv = ["lxc-start", "-n", name, "-P", str(self.lxcpath), "-f", str(config), "-F"]
        argv += ["-o", str(self.workdir / "lxc.log"), "-l", "WARN"] if self.workdir else []
        console.write(b"starting lxc container...\n")
        return self.run_watched(argv, console, timeout=timeout, stop=lambda: self._stop(name))

    def _stop(self, name: str) -> None:
        if self.workdir is None or not self.lxcpath.is_dir():
            return
        # exits non-zero when the container is not running: that is the idempotent case
        run(["lxc-stop", "-n", name, "-P", str(self.lxcpath), "-k"], check=False, timeout=60)

    def kill(self) -> None:
        self.mark_killed()
        if self.build_id is not None:
            self._stop(self.container_name(self.build_id))
        for proc in list(self._procs):
            terminate(proc)

    def cleanup(self) -> None:
        super().cleanup()
        build_id = self.build_id
        if build_id is None or self.workdir is None or not self.lxcpath.is_dir():
            return
        name = self.container_name(build_id)
        self._stop(name)
        if (self.lxcpath / name).exists():
            run(["lxc-destroy", "-n", name, "-P", str(self.lxcpath), "-f"], check=False, timeout=60)
        try:
            for leftover in self.lxcpath.iterdir():
                raise InfraError(f"lxc: {leftover} is left behind")
            self.lxcpath.rmdir()
        except FileNotFoundError:
            pass
