"""The guest agent: obs-build's 2nd stage, run inside the build machine.

    mount root -> /.build/build.data -> swap -> statistics monitor -> clock, lo, hostname
    -> recipe chrooted into the root (with /proc /sys /dev /dev/pts /dev/shm)
    -> kill leftovers -> _statistics -> swapoff -> blocklist manifest of the results on swap
    -> BUILDSTATUS -> sync, unmount -> power off

STDLIB ONLY. It runs on the host's python3 packed into the initramfs by
`local_backends/initramfs.py` (as PID 1, started by the initramfs' /init), or on a builder
image's own python3 (`python3 -m cloudbuild.guest.agent --root DEV --swap DEV`), or inside a
container (`--root-dir / --container`: no mounts, no swap, no power-off, the exit code is
the status).

Where things are (the contract with the host side, `cloudbuild/buildroot/stage.py`):
- `/.build/build.data`: obs-build's variables (RECIPEFILE, VM_SWAP, BUILD_JOBS, ...), plus
  BUILD_RESULTS (default `/.build.out/results`).
- The recipe `/.build-srcdir/$RECIPEFILE` runs with `/.build-srcdir` as working directory.
- The manifest lists, relative to `dirname($BUILD_RESULTS)`, the `results` tree and the
  `_statistics` file; it is written 512 bytes into the swap device (BUILDSTATUS sits in the
  first 12 bytes), exactly as obs-build's computeblocklists/vm_shutdown do.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pathlib
import signal
import stat
import sys
import time
from collections.abc import Mapping, Sequence

from cloudbuild.disk import buildstatus
from cloudbuild.guest import stats, sysops
from cloudbuild.guest.sysops import AgentError, say

MOUNTPOINT = "/mnt/buildroot"
DEFAULT_RESULTS = "/.build.out/results"
STATISTICS_NAME = "_statistics"
MANIFEST_PAD = 512
WATCHDOG_START = "### WATCHDOG MARKER START ###"
WATCHDOG_END = "### WATCHDOG MARKER END ###"
RECIPE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Config:
    """What the agent works on (a plain class: `dataclasses` costs a second of TCG at start-up)."""

    def __init__(
        self,
        root_device: str | None = None,
        fstype: str | None = None,
        mount_options: str = "",
        swap: str | None = None,
    ):
        self.root_device = root_device  # mount this ... (VM / builder)
        self.root_dir: str | None = None  # ... or use this folder as it is (container, chroot)
        self.fstype = fstype
        self.mount_options = mount_options
        self.swap = swap  # overrides build.data's VM_SWAP
        self.container = False  # never power off or touch sysrq; the exit code is the status
        self.poweroff = True


def kernel_cmdline() -> dict[str, str]:
    """`key=value` words of /proc/cmdline (root=, rootfstype=, rootflags=, cloudbuild.swap=)."""
    try:
        with open("/proc/cmdline", encoding="utf-8", errors="replace") as f:
            words = f.read().split()
    except OSError:
        return {}
    return dict(word.split("=", 1) for word in words if "=" in word)


USAGE = (
    "usage: python3 -m cloudbuild.guest.agent [--root DEVICE [--fstype FS] [--mount-options OPTS] | "
    "--root-dir DIR] [--swap DEVICE] [--container] [--no-poweroff]\n"
    "defaults come from the kernel command line: root=, rootfstype=, rootflags=, cloudbuild.swap=\n"
)


def parse_args(argv: Sequence[str], cmdline: Mapping[str, str]) -> Config:
    """A tiny parser (argparse would drag gettext & co. into the initramfs)."""
    config = Config(
        root_device=cmdline.get("root"),
        fstype=cmdline.get("rootfstype"),
        mount_options=cmdline.get("rootflags", ""),
        swap=cmdline.get("cloudbuild.swap"),
    )
    args = list(argv)
    valued = {
        "--root": "root_device",
        "--root-dir": "root_dir",
        "--fstype": "fstype",
        "--mount-options": "mount_options",
        "--swap": "swap",
    }
    while args:
        arg = args.pop(0)
        name, sep, inline = arg.partition("=")
        if name in valued:
            if not sep:
                if not args:
                    raise SystemExit(f"{name} needs an argument\n{USAGE}")
                inline = args.pop(0)
            setattr(config, valued[name], inline)
        elif arg == "--container":
            config.container = True
            config.poweroff = False
        elif arg == "--no-poweroff":
            config.poweroff = False
        elif arg in ("-h", "--help"):
            sys.stdout.write(USAGE)
            raise SystemExit(0)
        else:
            raise SystemExit(f"unknown argument {arg!r}\n{USAGE}")
    if config.root_dir:
        config.root_device = None
    if not config.root_device and not config.root_dir:
        raise SystemExit(
            f"no root: give --root DEVICE or --root-dir DIR (or root= on the kernel command line)\n{USAGE}"
        )
    return config


def load_build_data(root: str) -> dict[str, str | list[str]]:
    from cloudbuild.buildroot import builddata

    path = os.path.join(root, ".build", "build.data")
    try:
        return builddata.load_build_data(path)
    except OSError as exc:
        raise AgentError(f"cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise AgentError(str(exc)) from exc


def _value(data: Mapping[str, str | list[str]], key: str, default: str = "") -> str:
    value = data.get(key, default)
    return value if isinstance(value, str) else " ".join(value)


def result_paths(topdir: str, names: Sequence[str]) -> list[str]:
    """`find NAMES` run in `topdir`, without following symlinks: directories, files and symlinks.

    Sockets, fifos and device nodes are left out: they have no blocks to hand back.
    """
    out: list[str] = []
    for name in names:
        top = os.path.join(topdir, name)
        try:
            st = os.lstat(top)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                out.append(name)
            continue
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            rel = os.path.relpath(dirpath, topdir)
            out.append(rel)
            dirnames.sort()
            for entry in sorted(filenames) + [
                d for d in dirnames if os.path.islink(os.path.join(dirpath, d))
            ]:
                mode = os.lstat(os.path.join(dirpath, entry)).st_mode
                if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                    out.append(os.path.join(rel, entry))
    return out


def write_manifest(topdir: str, paths: Sequence[str], swap: str) -> None:
    """The blocklist manifest of `paths` (relative to `topdir`) onto the swap device after the pad.

    Built in memory first: a file that cannot be block-mapped must not leave half a manifest.
    """
    from cloudbuild.disk import blocklist

    buffer = io.BytesIO()
    fd = os.open(topdir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        count = blocklist.write_manifest(paths, buffer, padstart=MANIFEST_PAD, padend=MANIFEST_PAD, dir_fd=fd)
    except (OSError, ValueError, blocklist.BlocklistError) as exc:
        raise AgentError(f"cannot list the results: {exc}") from exc
    finally:
        os.close(fd)
    with open(swap, "r+b", buffering=0) as out:
        out.write(buffer.getvalue())
        os.fsync(out.fileno())
    say(f"... {count} entries, manifest of {buffer.tell()} bytes written to {swap}")


class Agent:
    def __init__(self, config: Config):
        self.config = config
        self.root = config.root_dir or MOUNTPOINT
        self.data: dict[str, str | list[str]] = {}
        self.swap: str | None = None
        self.swap_on = False
        self.watchdog = False
        self.api_mounts: list[str] = []
        self.monitor: stats.Monitor | None = None
        self.times: dict[str, int] = {}

    # --- the stages -------------------------------------------------------------------------

    def run(self) -> int:
        status = 3
        self.swap = self.config.swap  # known before build.data: a failure to read it is reported too
        try:
            self.second_stage()
            status = self.build()
            self.cleanup_build()
            if status in (0, 2):
                self.wrapup()
        except AgentError as exc:
            say(f"cloudbuild agent: {exc}")
            status = 3
        except Exception:
            import traceback  # only now: every import costs at start-up under TCG

            say("cloudbuild agent: internal error")
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
            status = 3
        return self.shutdown(status)

    def second_stage(self) -> None:
        """vm_detect_2nd_stage: mount the root, read build.data, swap, monitor, clock, lo, hostname."""
        config = self.config
        if config.root_device:
            if not sysops.wait_for_path(config.root_device):
                raise AgentError(f"root device {config.root_device} did not appear")
            sysops.mount(
                config.root_device, self.root, fstype=config.fstype, options=config.mount_options or ""
            )
        self.data = load_build_data(self.root)
        self.watchdog = _value(self.data, "VM_WATCHDOG") not in ("", "0", "false")
        if self.watchdog:
            say(WATCHDOG_END)
        say("2nd stage started in virtual machine")
        say(f"machine type: {os.uname().machine}")
        self.swap = config.swap or _value(self.data, "VM_SWAP") or None
        if self.swap and not config.container:
            self.swap_on = sysops.setup_swap(self.swap)
        if _value(self.data, "DO_STATISTICS", "1") == "1":
            self.monitor = stats.Monitor(self.root, os.path.join(self.root, ".build"))
            self.monitor.start()
        sysops.fix_clock(os.path.join(self.root, ".build", ".date"))
        if not config.container:
            sysops.loopback_up()
            sysops.set_hostname(_value(self.data, "MYHOSTNAME"))
            self.api_mounts = sysops.mount_api_filesystems(self.root)

    def build(self) -> int:
        """Run the recipe chrooted into the build root; 0 when it succeeded, 1 otherwise."""
        recipe = _value(self.data, "RECIPEFILE")
        if not recipe:
            raise AgentError("build.data names no RECIPEFILE")
        srcdir = "/.build-srcdir"
        path = recipe if recipe.startswith("/") else f"{srcdir}/{recipe}"
        env = {
            "PATH": RECIPE_PATH,
            "HOME": "/root",
            "SHELL": "/bin/sh",
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "BUILD_RESULTS": _value(self.data, "BUILD_RESULTS", DEFAULT_RESULTS),
            "BUILD_JOBS": _value(self.data, "BUILD_JOBS", "1"),
            "BUILD_ARCH": _value(self.data, "BUILD_ARCH"),
            "BUILD_ID": _value(self.data, "BUILD_ID"),
        }
        say(f"running {path} ...")
        started = time.monotonic()
        null = os.open("/dev/null", os.O_RDONLY)  # before the chroot: the root may have no /dev yet
        pid = os.fork()
        if pid == 0:  # the recipe
            try:
                os.dup2(null, 0)
                os.close(null)
                # python ignores SIGPIPE and SIGXFSZ; a recipe must get the default behaviour
                for signum in (signal.SIGPIPE, signal.SIGXFSZ):
                    signal.signal(signum, signal.SIG_DFL)
                os.chroot(self.root)
                os.chdir(srcdir if os.path.isdir(srcdir) else "/")
                try:
                    os.execve(path, [path], env)
                except OSError as exc:
                    if exc.errno != errno.ENOEXEC:
                        raise
                    os.execve("/bin/sh", ["/bin/sh", path], env)  # a script without #!
            except OSError as exc:
                sys.stderr.write(f"cannot run {path}: {exc.strerror}\n")
                sys.stderr.flush()
            os._exit(127)
        os.close(null)
        _, wait_status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(wait_status)
        self.times["TIME_main_build"] = round(time.monotonic() - started)
        say(f"{path} exited {code}" if code >= 0 else f"{path} killed by signal {-code}")
        return 0 if code == 0 else 1

    def cleanup_build(self) -> None:
        """No process of the build may outlive it: it could change results or scribble on swap."""
        sysops.kill_build_processes(self.root)
        for target in self.api_mounts:
            if not sysops.umount(target):
                sysops.umount(target, lazy=True)
        self.api_mounts = []
        say("... build processes stopped")

    def wrapup(self) -> None:
        """vm_wrapup_build: _statistics, swapoff, the manifest of the results on swap."""
        results = _value(self.data, "BUILD_RESULTS", DEFAULT_RESULTS)
        if not results.startswith("/") or ".." in results.split("/"):
            raise AgentError(f"BUILD_RESULTS {results!r} is not an absolute path")
        topdir = os.path.normpath(os.path.realpath(self.root) + os.path.dirname(results))
        if os.path.realpath(topdir) != topdir or not os.path.isdir(topdir):  # the build made it a link
            raise AgentError(f"{os.path.dirname(results)} is not a folder of the build root")
        self.save_statistics(os.path.join(topdir, STATISTICS_NAME))
        say("... statistics saved")
        if not self.swap:
            say("no swap device: the results stay in the build root")
            return
        say("... saving built packages")
        if self.swap_on:
            sysops.swapoff(self.swap)
            self.swap_on = False
        os.sync()  # blocks of delayed allocations must exist before their numbers are listed
        paths = result_paths(topdir, [os.path.basename(results), STATISTICS_NAME])
        write_manifest(topdir, paths, self.swap)

    def save_statistics(self, path: str) -> None:
        values: dict[str, int | str] = {}
        preinstall = _value(self.data, "TIME_PREINSTALL")
        if preinstall.isdigit():
            values["TIME_preinstall"] = int(preinstall)
        values.update(self.times)
        if self.monitor is not None:
            peaks = self.monitor.stop()
            self.monitor = None
            values["MAX_mb_used_on_disk"] = peaks.disk
            values["MAX_mb_used_memory"] = peaks.memory
        device = self.root_disk_name()
        if device:
            os.sync()  # count the writes of the build's delayed allocations too
            values.update(stats.io_counters(device))
        _remove_planted(path)
        with open(path, "w", encoding="ascii") as f:
            f.write(stats.format_statistics(values))

    def root_disk_name(self) -> str | None:
        device = self.config.root_device
        if device:
            name = os.path.basename(os.path.realpath(device))
            if os.path.exists(f"/sys/block/{name}/stat"):
                return name
        for name in ("vda", "sda", "xvda", "nvme0n1", "hda", "dasda", "ubda"):
            if os.path.exists(f"/sys/block/{name}/stat"):
                return name
        return None

    def shutdown(self, status: int) -> int:
        """vm_shutdown: BUILDSTATUS on swap, sync, unmount, power off (never in a container)."""
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self.watchdog:
            say(WATCHDOG_START)
        try:
            if self.api_mounts:
                self.cleanup_build()
            if self.swap:
                if self.swap_on:
                    sysops.swapoff(self.swap)
                buildstatus.write(pathlib.Path(self.swap), status)
        except Exception as exc:
            say(f"cloudbuild agent: cannot write the build status: {exc}")
        write_exit_file(self.root, status)
        os.sync()
        if self.config.root_device and not sysops.umount(self.root):
            sysops.umount(self.root, lazy=True)
        say(f"build status {status}")
        if self.config.poweroff and not self.config.container and not sysops.in_container():
            sysops.power_off()
        return status


def write_exit_file(root: str, status: int) -> None:
    """obs-build's /.build/_exitcode: the status for machines without a swap channel.

    The recipe had write access to /.build, so the file is written without following links:
    a planted symlink must not redirect the write (in the chroot backend it would hit the host).
    """
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        build_dir = os.open(os.path.join(root, ".build"), flags)
    except OSError as exc:
        say(f"cloudbuild agent: no /.build to leave the exit code in: {exc}")
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink("_exitcode", dir_fd=build_dir)
        fd = os.open("_exitcode", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=build_dir)
        try:
            os.write(fd, f"{status}\n".encode())
        finally:
            os.close(fd)
    except OSError as exc:
        say(f"cloudbuild agent: cannot write /.build/_exitcode: {exc}")
    finally:
        os.close(build_dir)


def _remove_planted(path: str) -> None:
    """Remove whatever the build left where the agent writes (it could be a symlink out of the root)."""
    if os.path.isdir(path) and not os.path.islink(path):
        raise AgentError(f"{path} is a folder")
    if os.path.lexists(path):
        os.unlink(path)


def main(argv: Sequence[str] | None = None) -> int:
    cmdline = kernel_cmdline()
    sysops.TIMING = cmdline.get("cloudbuild.timing") == "1"
    config = parse_args(sys.argv[1:] if argv is None else argv, cmdline)
    say("cloudbuild agent started")
    return Agent(config).run()


if __name__ == "__main__":
    sys.exit(main())
