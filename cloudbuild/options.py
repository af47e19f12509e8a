"""Every obs-build VM option, parsed the way obs-build parses it, into one immutable object.

obs-build's rules, kept so that existing farm scripts work unchanged:
- `-opt` and `--opt` are the same option; `--opt=value` gives the value inline.
- An option's value is the next argument only if that does not start with `-`; otherwise the
  option "needs an argument".
- `--kvm`/`--xen`/`--uml`/`--qemu`/`--emulator` select the VM type and take an *optional* image
  (the next argument when it does not start with `-`), so put RECIPE before them or use `--vm-type`.
- `--vm-type none` and `--vm-type chroot` mean no VM.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cloudbuild.errors import UsageError

NO_VM = "none"
BACKEND_MODULES: dict[str, str] = {
    # The one registry of VM types: name -> the module whose Backend serves it, imported on first
    # use so `cloudbuild --help` never imports boto3 or openstacksdk. A cloud's module is
    # `cloudbuild.cloud.<name>.backend`; its package's `gc` module serves `cloudbuild gc`.
    NO_VM: "local_backends.machines.chroot",
    "kvm": "local_backends.machines.kvm",
    "qemu": "local_backends.machines.qemu",
    "xen": "local_backends.machines.xen",
    "uml": "local_backends.machines.uml",
    "lxc": "local_backends.machines.lxc",
    "zvm": "local_backends.machines.zvm",
    "emulator": "local_backends.machines.emulator",
    "ec2": "cloudbuild.cloud.ec2.backend",
    "openstack": "cloudbuild.cloud.openstack.backend",
}
VM_TYPES = tuple(name for name in BACKEND_MODULES if name != NO_VM)
CLOUD_VM_TYPES = tuple(
    name for name, module in BACKEND_MODULES.items() if module.startswith("cloudbuild.cloud.")
)
FILESYSTEMS = ("ext4", "ext3", "ext2", "xfs", "btrfs", "reiserfs")
DEFAULT_MOUNT_OPTIONS = "__default"
LOG_FORMATS = ("auto", "console", "json")


@dataclass(frozen=True)
class VmOptions:
    """The parsed options of `cloudbuild build` (and of the commands that share them)."""

    vm_type: str = NO_VM
    vm_image: str | None = None  # --vm-disk or the image argument of --kvm & co.; None = default path
    vm_swap: str | None = None
    vm_kernel: str | None = None
    vm_initrd: str | None = None
    vm_worker: str | None = None
    vm_worker_nr: int | None = None
    vm_server: str | None = None
    vm_volume_root: str | None = None
    vm_volume_swap: str | None = None
    vm_memory: int | None = None  # MiB
    disk_size: int = 4096  # MiB
    swap_size: int = 1024  # MiB
    filesystem: str = "ext4"
    mount_options: str = DEFAULT_MOUNT_OPTIONS
    disk_clean: bool = False
    rpmlist: str | None = None
    hugetlbfs: str | None = None
    watchdog: bool = False
    emulator_script: str | None = None
    shell: bool = False  # RUN_SHELL: a shell in the build machine instead of the recipe
    shell_after_fail: bool = False  # a shell in the build machine after a failed recipe
    # cloudbuild's own options
    rootfs: str | None = None
    dest: str | None = None
    root: str | None = None  # BUILD_ROOT: where default images and work files live
    build_id: str | None = None
    jobs: int = 1
    build_timeout: float | None = None
    log_format: str = "auto"
    ec2_builder_ami: str | None = None
    ec2_instance_type: str | None = None
    ec2_subnet: str | None = None
    ec2_security_group: str | None = None
    ec2_pool: int = 0
    ec2_pool_max_uses: int = 20
    trust_domain: str = ""
    openstack_flavor: str | None = None
    openstack_network: str | None = None
    openstack_pool: int = 0
    positionals: tuple[str, ...] = ()

    @property
    def is_vm(self) -> bool:
        return self.vm_type != NO_VM

    def replace(self, **changes: Any) -> VmOptions:
        return dataclasses.replace(self, **changes)


Kind = Literal["value", "flag", "shorthand", "pair"]


@dataclass(frozen=True)
class OptionSpec:
    names: tuple[str, ...]  # spellings without leading dashes; the first is the canonical one
    dest: str
    kind: Kind
    help: str
    metavar: str = "ARG"
    convert: Callable[[str, str], Any] = field(default=lambda opt, value: value)


def _is_number(text: str) -> bool:
    # ASCII only: str.isdigit() accepts "²" (which int() refuses) and other scripts' digits
    return text.isascii() and text.isdigit()


def _positive_int(opt: str, value: str) -> int:
    if not _is_number(value) or int(value) <= 0:
        raise UsageError(f"{opt}: '{value}' is not a positive number")
    return int(value)


def _non_negative_int(opt: str, value: str) -> int:
    if not _is_number(value):
        raise UsageError(f"{opt}: '{value}' is not a number (0 or more)")
    return int(value)


def _seconds(opt: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < math.inf:
        raise UsageError(f"{opt}: '{value}' is not a positive number of seconds")
    return seconds


def _memory_mib(opt: str, value: str) -> int:
    """MiB, as obs-build passes it to the hypervisor; an M or G suffix is accepted."""
    text = value.strip()
    factor = 1
    if text[-1:].upper() in ("M", "G"):
        factor = 1024 if text[-1:].upper() == "G" else 1
        text = text[:-1]
    if not _is_number(text) or int(text) <= 0:
        raise UsageError(f"{opt}: '{value}' is not a positive size in MiB (e.g. 2048 or 2G)")
    return int(text) * factor


def _vm_type(opt: str, value: str) -> str:
    if value in ("none", "chroot"):
        return NO_VM
    if value not in VM_TYPES:
        raise UsageError(f"VM '{value}' is not supported (choose one of {', '.join(VM_TYPES)}, none, chroot)")
    return value


def _filesystem(opt: str, value: str) -> str:
    if value not in FILESYSTEMS:
        raise UsageError(
            f"{opt}: filesystem '{value}' is not supported: no mkfs entry (choose {', '.join(FILESYSTEMS)})"
        )
    return value


def _strip_quotes(opt: str, value: str) -> str:
    # obs-build: options are quoted to allow values starting with "-o ...": strip one pair of quotes
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _log_format(opt: str, value: str) -> str:
    if value not in LOG_FORMATS:
        raise UsageError(f"{opt}: '{value}' is not a log format (choose {', '.join(LOG_FORMATS)})")
    return value


SPECS: tuple[OptionSpec, ...] = (
    OptionSpec(
        ("vm-type",),
        "vm_type",
        "value",
        "VM type: " + ", ".join(VM_TYPES) + ", none/chroot (no VM)",
        "TYPE",
        _vm_type,
    ),
    *(
        OptionSpec(
            (t,),
            "vm_type",
            "shorthand",
            f"same as --vm-type {t}; an optional IMAGE names the root disk",
            "[IMAGE]",
        )
        for t in ("kvm", "xen", "uml", "qemu", "emulator")
    ),
    *(OptionSpec((t,), "vm_type", "flag", f"same as --vm-type {t}") for t in ("zvm", "lxc")),
    OptionSpec(("vm-worker",), "vm_worker", "value", "worker name (z/VM: the build guest)", "NAME"),
    OptionSpec(
        ("vm-worker-nr", "vm-worker-no"),
        "vm_worker_nr",
        "value",
        "worker number (z/VM device numbers)",
        "N",
        _non_negative_int,
    ),
    OptionSpec(
        ("vm-server", "vm-region"), "vm_server", "value", "cloud server id / region of the worker", "ID"
    ),
    OptionSpec(
        ("vm-volumes",), "vm_volume_root", "pair", "use existing cloud volumes ROOT and SWAP", "ROOT [SWAP]"
    ),
    OptionSpec(("vm-disk",), "vm_image", "value", "root disk: image file, block device or volume", "IMAGE"),
    OptionSpec(
        ("vm-swap", "xenswap", "swap"), "vm_swap", "value", "swap disk: image file or block device", "SWAP"
    ),
    OptionSpec(
        ("vm-memory", "xenmemory", "memory"), "vm_memory", "value", "guest memory in MiB", "MIB", _memory_mib
    ),
    OptionSpec(("vm-kernel",), "vm_kernel", "value", "kernel to boot (OpenStack: the builder image)", "FILE"),
    OptionSpec(("vm-initrd",), "vm_initrd", "value", "initrd to boot", "FILE"),
    OptionSpec(
        ("vm-disk-size", "vmdisk-rootsize"),
        "disk_size",
        "value",
        "root disk size in MiB (default 4096)",
        "MIB",
        _positive_int,
    ),
    OptionSpec(
        ("vm-swap-size", "vmdisk-swapsize"),
        "swap_size",
        "value",
        "swap disk size in MiB (default 1024)",
        "MIB",
        _positive_int,
    ),
    OptionSpec(
        ("vm-disk-filesystem", "vmdisk-filesystem"),
        "filesystem",
        "value",
        "root filesystem: " + ", ".join(FILESYSTEMS) + " (default ext4)",
        "FS",
        _filesystem,
    ),
    OptionSpec(
        ("vm-disk-mount-options", "vmdisk-mount-options"),
        "mount_options",
        "value",
        "mount options of the root disk (surrounding quotes stripped)",
        "OPTS",
        _strip_quotes,
    ),
    OptionSpec(("vmdisk-clean",), "disk_clean", "flag", "delete and recreate root and swap before the build"),
    OptionSpec(("rpmlist",), "rpmlist", "value", "package list for the build root (obs-build)", "FILE"),
    OptionSpec(("hugetlbfs",), "hugetlbfs", "value", "back guest memory with this hugetlbfs mount", "PATH"),
    OptionSpec(("vm-watchdog",), "watchdog", "flag", "kill the VM when a watchdog marker stays open 300 s"),
    OptionSpec(("emulator-script",), "emulator_script", "value", "script that runs the emulator", "SCRIPT"),
    OptionSpec(
        ("shell",), "shell", "flag", "a shell in the build machine instead of the recipe (qemu, kvm, chroot)"
    ),
    OptionSpec(
        ("shell-after-fail",),
        "shell_after_fail",
        "flag",
        "a shell in the build machine after a failed recipe",
    ),
    OptionSpec(
        ("rootfs",), "rootfs", "value", "build root to start from: directory, tarball or image", "PATH"
    ),
    OptionSpec(("dest",), "dest", "value", "where the results go (must not exist or be empty)", "DIR"),
    OptionSpec(("root",), "root", "value", "work folder for default images and logs (BUILD_ROOT)", "DIR"),
    OptionSpec(("build-id",), "build_id", "value", "build id (default: generated)", "ID"),
    OptionSpec(("jobs", "j"), "jobs", "value", "CPUs of the build machine (default 1)", "N", _positive_int),
    OptionSpec(
        ("build-timeout",),
        "build_timeout",
        "value",
        "kill the build after this many seconds",
        "SECONDS",
        _seconds,
    ),
    OptionSpec(
        ("log-format",), "log_format", "value", "auto (console on a TTY), console or json", "FMT", _log_format
    ),
    OptionSpec(("ec2-builder-ami",), "ec2_builder_ami", "value", "EC2: AMI of the builder instances", "AMI"),
    OptionSpec(("ec2-instance-type",), "ec2_instance_type", "value", "EC2: builder instance type", "TYPE"),
    OptionSpec(("ec2-subnet",), "ec2_subnet", "value", "EC2: subnet of the builders", "SUBNET"),
    OptionSpec(
        ("ec2-security-group",), "ec2_security_group", "value", "EC2: security group of the builders", "SG"
    ),
    OptionSpec(
        ("ec2-pool",),
        "ec2_pool",
        "value",
        "EC2: keep N stopped builders warm (0 = none)",
        "N",
        _non_negative_int,
    ),
    OptionSpec(
        ("ec2-pool-max-uses",),
        "ec2_pool_max_uses",
        "value",
        "EC2: a pooled builder serves at most N builds, then it is terminated (default 20)",
        "N",
        _positive_int,
    ),
    OptionSpec(
        ("trust-domain",),
        "trust_domain",
        "value",
        "who may share a reused (warm pool) builder: only builds of the same domain (default: the empty one)",
        "NAME",
    ),
    OptionSpec(("openstack-flavor",), "openstack_flavor", "value", "OpenStack: builder flavor", "FLAVOR"),
    OptionSpec(
        ("openstack-network",),
        "openstack_network",
        "value",
        "OpenStack: builder network (default none)",
        "NET",
    ),
    OptionSpec(
        ("openstack-pool",),
        "openstack_pool",
        "value",
        "OpenStack: keep N stopped builders warm (0 = none)",
        "N",
        _non_negative_int,
    ),
)

_BY_NAME: dict[str, OptionSpec] = {name: spec for spec in SPECS for name in spec.names}


def _takes_value(arg: str | None) -> bool:
    return arg is not None and not arg.startswith("-")


class _Cursor:
    """Walks argv the way obs-build's option loop does."""

    def __init__(self, argv: Sequence[str]):
        self.args = list(argv)
        self.pos = 0

    def next(self) -> str | None:
        return self.args[self.pos] if self.pos < len(self.args) else None

    def take(self) -> str:
        value = self.args[self.pos]
        self.pos += 1
        return value

    def value(self, opt: str, inline: str | None) -> str:
        """The option's argument: inline after `=`, else the next argument unless it starts with `-`."""
        if inline is not None:
            if inline == "":
                raise UsageError(f"{opt} needs an argument")
            return inline
        if not _takes_value(self.next()):
            raise UsageError(f"{opt} needs an argument")
        return self.take()


def parse(argv: Sequence[str], *, defaults: VmOptions | None = None) -> VmOptions:
    """Parse obs-build style options; anything that is not an option is kept in `positionals`."""
    values: dict[str, Any] = {}
    positionals: list[str] = []
    cursor = _Cursor(argv)
    while cursor.next() is not None:
        param = cursor.take()
        if param == "--":
            positionals.extend(cursor.args[cursor.pos :])
            break
        if not param.startswith("-") or param == "-":
            positionals.append(param)
            continue
        name = param[2:] if param.startswith("--") else param[1:]
        inline: str | None = None
        if "=" in name:
            name, inline = name.split("=", 1)
        spec = _BY_NAME.get(name)
        if spec is None:
            raise UsageError(f"unknown option '{param}' (see cloudbuild build --help)")
        opt = f"--{name}"
        if spec.kind == "value":
            values[spec.dest] = spec.convert(opt, cursor.value(opt, inline))
        elif spec.kind == "flag":
            if inline is not None:
                raise UsageError(f"{opt} takes no argument")
            values[spec.dest] = spec.names[0] if spec.dest == "vm_type" else True
        elif spec.kind == "shorthand":
            values["vm_type"] = spec.names[0]
            if inline is not None or _takes_value(cursor.next()):
                values["vm_image"] = cursor.value(opt, inline)
        elif spec.kind == "pair":
            values["vm_volume_root"] = cursor.value(opt, inline)
            if _takes_value(cursor.next()):
                values["vm_volume_swap"] = cursor.take()
    base = defaults or VmOptions()
    return base.replace(positionals=tuple(positionals), **values)


def help_text(usage: str) -> str:
    """The option table for `--help`, generated from SPECS so it can never drift from the parser."""
    lines = [usage, "", "options (obs-build spellings; -opt, --opt and --opt=value all work):"]
    for spec in SPECS:
        names = ", ".join(f"--{n}" for n in spec.names)
        if spec.kind in ("value", "shorthand", "pair"):
            names += f" {spec.metavar}"
        lines.append(f"  {names:<44} {spec.help}")
    lines += [
        "",
        "exit codes: 0 ok, 1 build failed (or bad options), 2 unchanged, 3 infrastructure problem",
        "(retry elsewhere), 4 host broken",
    ]
    return "\n".join(lines)


def resolve_paths(options: VmOptions, *, cwd: Path | None = None) -> VmOptions:
    """Make the local paths absolute so later phases do not depend on the working directory."""
    base = cwd or Path.cwd()
    changes: dict[str, Any] = {}
    # not --emulator-script: obs-build resolves a relative name in the emulator folder (local_backends/machines/emulator.py)
    names = ["rootfs", "dest", "root", "rpmlist", "hugetlbfs"]
    if options.vm_type not in CLOUD_VM_TYPES:
        # on a cloud these name a volume or an image, not a local file
        names += ["vm_image", "vm_swap", "vm_kernel", "vm_initrd"]
    for name in names:
        value = getattr(options, name)
        if value is not None and not Path(value).is_absolute():
            changes[name] = str(base / value)
    return options.replace(**changes)
