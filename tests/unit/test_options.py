"""Options: every obs-build spelling, obs-build's parsing rules, defaults and every error."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

from cloudbuild import options
from cloudbuild.errors import ExitCode, UsageError
from cloudbuild.options import DEFAULT_MOUNT_OPTIONS, NO_VM, SPECS, VmOptions, help_text, parse

# Every spelling obs-build's vm_parse_options accepts (the seed, read by hand), with the field it
# sets. Listed explicitly so that dropping an alias from SPECS fails here.
SEED_SPELLINGS: dict[str, str] = {
    "emulator-script": "emulator_script",
    "xen": "vm_type",
    "kvm": "vm_type",
    "uml": "vm_type",
    "qemu": "vm_type",
    "emulator": "vm_type",
    "zvm": "vm_type",
    "lxc": "vm_type",
    "vm-type": "vm_type",
    "vm-worker": "vm_worker",
    "vm-worker-nr": "vm_worker_nr",
    "vm-worker-no": "vm_worker_nr",
    "vm-server": "vm_server",
    "vm-region": "vm_server",
    "vm-volumes": "vm_volume_root",
    "vm-disk": "vm_image",
    "xenswap": "vm_swap",
    "vm-swap": "vm_swap",
    "swap": "vm_swap",
    "xenmemory": "vm_memory",
    "vm-memory": "vm_memory",
    "memory": "vm_memory",
    "vm-kernel": "vm_kernel",
    "vm-initrd": "vm_initrd",
    "vmdisk-rootsize": "disk_size",
    "vm-disk-size": "disk_size",
    "vmdisk-swapsize": "swap_size",
    "vm-swap-size": "swap_size",
    "vmdisk-filesystem": "filesystem",
    "vm-disk-filesystem": "filesystem",
    "vmdisk-mount-options": "mount_options",
    "vm-disk-mount-options": "mount_options",
    "vmdisk-clean": "disk_clean",
    "rpmlist": "rpmlist",
    "hugetlbfs": "hugetlbfs",
    "vm-watchdog": "watchdog",
}

# A valid argument for every value option, and what it parses to.
SAMPLE: dict[str, tuple[str, Any]] = {
    "vm_type": ("kvm", "kvm"),
    "vm_worker": ("worker7", "worker7"),
    "vm_worker_nr": ("3", 3),
    "vm_server": ("eu-central-1", "eu-central-1"),
    "vm_image": ("/var/tmp/root.img", "/var/tmp/root.img"),
    "vm_swap": ("/var/tmp/swap.img", "/var/tmp/swap.img"),
    "vm_memory": ("2048", 2048),
    "vm_kernel": ("/boot/vmlinuz", "/boot/vmlinuz"),
    "vm_initrd": ("/boot/initrd", "/boot/initrd"),
    "disk_size": ("8192", 8192),
    "swap_size": ("2048", 2048),
    "filesystem": ("xfs", "xfs"),
    "mount_options": ("noatime,nodiratime", "noatime,nodiratime"),
    "rpmlist": ("rpms.list", "rpms.list"),
    "hugetlbfs": ("/dev/hugepages", "/dev/hugepages"),
    "emulator_script": ("run-emu.sh", "run-emu.sh"),
    "rootfs": ("root.tar", "root.tar"),
    "dest": ("out", "out"),
    "root": ("/var/tmp/build-root", "/var/tmp/build-root"),
    "build_id": ("b-1", "b-1"),
    "jobs": ("8", 8),
    "build_timeout": ("3600", 3600.0),
    "log_format": ("json", "json"),
    "ec2_builder_ami": ("ami-123", "ami-123"),
    "ec2_instance_type": ("c6i.large", "c6i.large"),
    "ec2_subnet": ("subnet-1", "subnet-1"),
    "ec2_security_group": ("sg-1", "sg-1"),
    "ec2_pool": ("2", 2),
    "ec2_pool_max_uses": ("3", 3),
    "trust_domain": ("team-a", "team-a"),
    "openstack_flavor": ("m1.large", "m1.large"),
    "openstack_network": ("net0", "net0"),
    "openstack_pool": ("3", 3),
}

ALL_SPELLINGS = [(name, spec) for spec in SPECS for name in spec.names]
VALUE_SPELLINGS = [(n, s) for n, s in ALL_SPELLINGS if s.kind == "value"]
FLAG_SPELLINGS = [(n, s) for n, s in ALL_SPELLINGS if s.kind == "flag"]


def spec_of(name: str) -> options.OptionSpec:
    return next(spec for spec in SPECS if name in spec.names)


# --- every spelling ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "dest"), sorted(SEED_SPELLINGS.items()))
def test_every_seed_spelling_exists_and_sets_the_same_field(name: str, dest: str) -> None:
    assert spec_of(name).dest == dest


def test_specs_cover_every_field_and_no_spelling_twice() -> None:
    names = [name for name, _ in ALL_SPELLINGS]
    assert len(names) == len(set(names))
    dests = {spec.dest for spec in SPECS} | {"vm_volume_swap", "positionals"}
    assert dests == {f.name for f in VmOptions.__dataclass_fields__.values()}


@pytest.mark.parametrize("dashes", ["--", "-"])
@pytest.mark.parametrize(("name", "spec"), VALUE_SPELLINGS, ids=[n for n, _ in VALUE_SPELLINGS])
def test_value_option_takes_the_next_argument(name: str, spec: options.OptionSpec, dashes: str) -> None:
    raw, parsed = SAMPLE[spec.dest]
    result = parse([f"{dashes}{name}", raw, "recipe.spec"])
    assert getattr(result, spec.dest) == parsed
    assert result.positionals == ("recipe.spec",)


@pytest.mark.parametrize("dashes", ["--", "-"])
@pytest.mark.parametrize(("name", "spec"), VALUE_SPELLINGS, ids=[n for n, _ in VALUE_SPELLINGS])
def test_value_option_takes_an_inline_value(name: str, spec: options.OptionSpec, dashes: str) -> None:
    raw, parsed = SAMPLE[spec.dest]
    result = parse([f"{dashes}{name}={raw}", "recipe.spec"])
    assert getattr(result, spec.dest) == parsed
    assert result.positionals == ("recipe.spec",)


@pytest.mark.parametrize(("name", "spec"), VALUE_SPELLINGS, ids=[n for n, _ in VALUE_SPELLINGS])
def test_value_option_without_argument_needs_one(name: str, spec: options.OptionSpec) -> None:
    with pytest.raises(UsageError, match=f"^--{name} needs an argument$"):
        parse([f"--{name}"])
    with pytest.raises(UsageError, match=f"^--{name} needs an argument$"):
        parse([f"--{name}", "--vmdisk-clean"])
    with pytest.raises(UsageError, match=f"^--{name} needs an argument$"):
        parse([f"-{name}="])


@pytest.mark.parametrize("dashes", ["--", "-"])
@pytest.mark.parametrize(("name", "spec"), FLAG_SPELLINGS, ids=[n for n, _ in FLAG_SPELLINGS])
def test_flag_takes_no_argument(name: str, spec: options.OptionSpec, dashes: str) -> None:
    result = parse([f"{dashes}{name}", "recipe.spec"])
    expected = name if spec.dest == "vm_type" else True
    assert getattr(result, spec.dest) == expected
    assert result.positionals == ("recipe.spec",)
    with pytest.raises(UsageError, match=f"^--{name} takes no argument$"):
        parse([f"{dashes}{name}=x"])


# --- VM type and its shorthands ---------------------------------------------------------------


@pytest.mark.parametrize("vm_type", options.VM_TYPES)
def test_vm_type_accepts_every_supported_type(vm_type: str) -> None:
    result = parse(["--vm-type", vm_type])
    assert result.vm_type == vm_type
    assert result.is_vm


@pytest.mark.parametrize("value", ["none", "chroot"])
def test_vm_type_none_and_chroot_mean_no_vm(value: str) -> None:
    result = parse(["--vm-type", value])
    assert result.vm_type == NO_VM
    assert not result.is_vm


def test_unknown_vm_type_is_not_supported() -> None:
    with pytest.raises(UsageError, match=r"^VM 'x' is not supported"):
        parse(["--vm-type", "x"])
    with pytest.raises(UsageError) as info:
        parse(["--vm-type=nosuchvm"])
    assert info.value.exit_code == ExitCode.BUILD_FAILED


@pytest.mark.parametrize("shorthand", ["kvm", "xen", "uml", "qemu", "emulator"])
@pytest.mark.parametrize("dashes", ["--", "-"])
def test_shorthand_takes_an_optional_image(shorthand: str, dashes: str) -> None:
    with_image = parse([f"{dashes}{shorthand}", "/img/root", "recipe.spec"])
    assert (with_image.vm_type, with_image.vm_image) == (shorthand, "/img/root")
    assert with_image.positionals == ("recipe.spec",)

    inline = parse([f"{dashes}{shorthand}=/img/root"])
    assert (inline.vm_type, inline.vm_image) == (shorthand, "/img/root")

    before_option = parse([f"{dashes}{shorthand}", "--vm-memory", "512"])
    assert (before_option.vm_type, before_option.vm_image, before_option.vm_memory) == (shorthand, None, 512)

    last = parse(["recipe.spec", f"{dashes}{shorthand}"])
    assert (last.vm_type, last.vm_image, last.positionals) == (shorthand, None, ("recipe.spec",))


def test_shorthand_swallows_a_following_recipe_as_its_image() -> None:
    # obs-build's rule, kept on purpose: put RECIPE first or use --vm-type
    result = parse(["--kvm", "recipe.spec"])
    assert (result.vm_image, result.positionals) == ("recipe.spec", ())


def test_shorthand_keeps_an_image_given_before() -> None:
    result = parse(["--vm-disk", "/img/a", "--kvm"])
    assert (result.vm_type, result.vm_image) == ("kvm", "/img/a")


def test_shorthand_with_empty_inline_image_needs_an_argument() -> None:
    with pytest.raises(UsageError, match=r"^--kvm needs an argument$"):
        parse(["--kvm="])


@pytest.mark.parametrize("flag", ["zvm", "lxc"])
def test_zvm_and_lxc_take_no_image(flag: str) -> None:
    result = parse([f"--{flag}", "recipe.spec"])
    assert (result.vm_type, result.vm_image, result.positionals) == (flag, None, ("recipe.spec",))


# --- --vm-volumes ROOT [SWAP] -----------------------------------------------------------------


def test_vm_volumes_takes_root_and_swap() -> None:
    result = parse(["--vm-volumes", "vol-root", "vol-swap", "--vm-type", "ec2"])
    assert (result.vm_volume_root, result.vm_volume_swap) == ("vol-root", "vol-swap")
    assert result.vm_type == "ec2"


def test_vm_volumes_swap_is_optional_before_an_option_or_at_the_end() -> None:
    result = parse(["--vm-volumes", "vol-root", "--vm-type", "ec2"])
    assert (result.vm_volume_root, result.vm_volume_swap) == ("vol-root", None)
    assert parse(["-vm-volumes", "vol-root"]).vm_volume_swap is None


def test_vm_volumes_inline_root_and_next_swap() -> None:
    result = parse(["--vm-volumes=vol-root", "vol-swap"])
    assert (result.vm_volume_root, result.vm_volume_swap) == ("vol-root", "vol-swap")


def test_vm_volumes_swallows_a_following_recipe_as_swap() -> None:
    result = parse(["--vm-volumes", "vol-root", "recipe.spec"])
    assert (result.vm_volume_swap, result.positionals) == ("recipe.spec", ())


def test_vm_volumes_needs_a_root() -> None:
    with pytest.raises(UsageError, match=r"^--vm-volumes needs an argument$"):
        parse(["--vm-volumes"])
    with pytest.raises(UsageError, match=r"^--vm-volumes needs an argument$"):
        parse(["--vm-volumes", "--kvm"])


# --- values -----------------------------------------------------------------------------------


def test_defaults() -> None:
    result = parse([])
    assert result == VmOptions()
    assert result.vm_type == NO_VM
    assert result.disk_size == 4096
    assert result.swap_size == 1024
    assert result.filesystem == "ext4"
    assert result.mount_options == DEFAULT_MOUNT_OPTIONS == "__default"
    assert result.disk_clean is False
    assert result.watchdog is False
    assert result.jobs == 1
    assert result.vm_memory is None
    assert result.vm_image is None


def test_defaults_argument_is_the_base() -> None:
    base = VmOptions(vm_type="kvm", disk_size=100)
    result = parse(["--vm-swap-size", "10"], defaults=base)
    assert (result.vm_type, result.disk_size, result.swap_size) == ("kvm", 100, 10)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [('"-o noatime"', "-o noatime"), ('"noatime"', "noatime"), ("noatime", "noatime"), ('"', '"')],
)
def test_mount_options_lose_one_pair_of_surrounding_quotes(raw: str, expected: str) -> None:
    assert parse(["--vm-disk-mount-options", raw]).mount_options == expected
    assert parse([f"--vmdisk-mount-options={raw}"]).mount_options == expected


def test_mount_options_starting_with_a_dash_need_quotes_or_the_inline_form() -> None:
    with pytest.raises(UsageError, match="needs an argument"):
        parse(["--vm-disk-mount-options", "-o noatime"])
    assert parse(["--vm-disk-mount-options=-o noatime"]).mount_options == "-o noatime"


@pytest.mark.parametrize("fs", options.FILESYSTEMS)
def test_every_filesystem_is_accepted(fs: str) -> None:
    assert parse(["--vmdisk-filesystem", fs]).filesystem == fs


def test_unknown_filesystem() -> None:
    with pytest.raises(UsageError, match=r"^--vm-disk-filesystem: filesystem 'zfs' is not supported"):
        parse(["--vm-disk-filesystem", "zfs"])


def test_options_filesystems_are_the_mkfs_table() -> None:
    from cloudbuild.disk.mkfs import FILESYSTEMS

    assert set(options.FILESYSTEMS) == set(FILESYSTEMS)


@pytest.mark.parametrize(
    "opt", ["--vm-disk-size", "--vmdisk-rootsize", "--vm-swap-size", "--vmdisk-swapsize"]
)
@pytest.mark.parametrize("value", ["0", "-1", "abc", "1.5", "²", "٣", " 1", "1M"])
def test_sizes_must_be_positive_numbers(opt: str, value: str) -> None:
    with pytest.raises(UsageError) as info:
        parse([f"{opt}={value}"])
    assert str(info.value) == f"{opt}: '{value}' is not a positive number"


@pytest.mark.parametrize("value", ["0", "-5", "x", "²", "0G", "G", "1.5G"])
def test_memory_must_be_a_positive_size(value: str) -> None:
    with pytest.raises(UsageError, match=r"--vm-memory: '.*' is not a positive size in MiB"):
        parse([f"--vm-memory={value}"])


@pytest.mark.parametrize(("value", "mib"), [("2048", 2048), ("512M", 512), ("2G", 2048), ("2g", 2048)])
def test_memory_accepts_mib_and_a_suffix(value: str, mib: int) -> None:
    assert parse(["--memory", value]).vm_memory == mib


def test_memory_needs_an_argument() -> None:
    with pytest.raises(UsageError, match=r"^--vm-memory needs an argument$"):
        parse(["--vm-memory"])
    with pytest.raises(UsageError, match=r"^--xenmemory needs an argument$"):
        parse(["-xenmemory", "-kvm"])


@pytest.mark.parametrize("value", ["x", "²", "-1"])
def test_worker_number_is_a_number(value: str) -> None:
    with pytest.raises(UsageError, match=r"is not a number|needs an argument"):
        parse([f"--vm-worker-nr={value}"])
    assert parse(["--vm-worker-no", "0"]).vm_worker_nr == 0


@pytest.mark.parametrize("value", ["0", "-1", "x", "nan", "inf", "1e999"])
def test_build_timeout_is_a_positive_finite_number_of_seconds(value: str) -> None:
    with pytest.raises(UsageError, match="is not a positive number of seconds"):
        parse([f"--build-timeout={value}"])
    assert parse(["--build-timeout", "1.5"]).build_timeout == 1.5


def test_log_format_is_one_of_three() -> None:
    for fmt in options.LOG_FORMATS:
        assert parse(["--log-format", fmt]).log_format == fmt
    with pytest.raises(UsageError, match="is not a log format"):
        parse(["--log-format", "xml"])


# --- positionals and unknown options ----------------------------------------------------------


@pytest.mark.parametrize("arg", ["--nosuch", "-nosuch", "--nosuch=1", "---vm-type", "--Vm-Type"])
def test_unknown_option(arg: str) -> None:
    with pytest.raises(UsageError, match=f"^unknown option '{arg}'"):
        parse([arg])


def test_positionals_are_kept_in_order_and_double_dash_ends_options() -> None:
    result = parse(["a", "--vm-type", "kvm", "-", "b", "--", "--vm-memory", "c"])
    assert result.positionals == ("a", "-", "b", "--vm-memory", "c")
    assert result.vm_memory is None


def test_later_option_wins() -> None:
    assert parse(["--memory", "1", "--vm-memory", "2"]).vm_memory == 2
    assert parse(["--kvm", "--vm-type", "none"]).vm_type == NO_VM


def test_resolve_paths_makes_local_paths_absolute(tmp_path: Path) -> None:
    result = options.resolve_paths(
        parse(["--rootfs", "r", "--dest", "/abs", "--vm-kernel", "k"]), cwd=tmp_path
    )
    assert (result.rootfs, result.dest, result.vm_kernel) == (
        str(tmp_path / "r"),
        "/abs",
        str(tmp_path / "k"),
    )


def test_resolve_paths_leaves_openstack_kernel_names_alone(tmp_path: Path) -> None:
    result = options.resolve_paths(parse(["--vm-type", "openstack", "--vm-kernel", "img"]), cwd=tmp_path)
    assert result.vm_kernel == "img"


# --- help -------------------------------------------------------------------------------------


def _build_help() -> str:
    """What `cloudbuild build --help` prints, from a real process."""
    from cloudbuild.runner import run

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = run([sys.executable, "-m", "cloudbuild", "build", "--help"], env=env, timeout=60)
    out: str = proc.stdout
    return out


@pytest.fixture(scope="module")
def build_help() -> str:
    return _build_help()


@pytest.mark.parametrize("name", sorted({n for n, _ in ALL_SPELLINGS} | set(SEED_SPELLINGS)))
def test_help_lists_every_spelling(name: str, build_help: str) -> None:
    assert f"--{name}" in build_help.replace(",", " ").split()


def test_help_text_is_generated_from_every_spec() -> None:
    text = help_text("usage: x")
    for name, _ in ALL_SPELLINGS:
        assert f"--{name}" in text.replace(",", " ").split()


def test_help_names_the_exit_codes(build_help: str) -> None:
    assert "exit codes" in build_help
    for code in "01234":
        assert f"{code} " in build_help


def test_docs_options_md_names_every_spelling() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "options.md").read_text()
    missing = [n for n, _ in ALL_SPELLINGS if f"`--{n}`" not in doc and f"`-{n}`" not in doc]
    assert missing == []


def test_resolve_paths_makes_local_disks_absolute_but_leaves_cloud_volume_ids(tmp_path: Path) -> None:
    local = options.resolve_paths(
        options.parse(
            [
                "--vm-type",
                "qemu",
                "--vm-disk",
                "root.img",
                "--vm-swap",
                "s.img",
                "--rpmlist",
                "list",
                "--dest",
                "out",
            ]
        ),
        cwd=tmp_path,
    )
    assert (local.vm_image, local.vm_swap, local.rpmlist, local.dest) == (
        str(tmp_path / "root.img"),
        str(tmp_path / "s.img"),
        str(tmp_path / "list"),
        str(tmp_path / "out"),
    )
    cloud = options.resolve_paths(
        options.parse(["--vm-type", "ec2", "--vm-disk", "vol-123", "--dest", "out"]), cwd=tmp_path
    )
    assert cloud.vm_image == "vol-123"
    assert cloud.dest == str(tmp_path / "out")
