"""build.data: obs-build's format, read back by real bash and by our shell-free reader."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudbuild.buildroot import builddata
from cloudbuild.buildroot.builddata import (
    ARRAY_VARIABLES,
    BUILD_DATA_VARIABLES,
    fill_defaults,
    format_build_data,
    load_build_data,
    read_build_data,
    write_build_data,
)
from cloudbuild.runner import run

# What obs-build's vm_first_stage writes, in this order (the seed, read by hand).
SEED_VARIABLES = [
    *("RECIPEFILE", "BUILD_JOBS", "BUILD_ARCH", "BUILD_RPMS", "BUILD_DIST", "RELEASE", "BUILD_DEBUG"),
    *("SIGNDUMMY", "DO_LINT", "DO_CHECKS", "NOROOTFORBUILD", "CREATE_BASELIBS", "REASON", "CHANGELOG"),
    *("INCARNATION", "DISTURL", "DO_INIT", "KIWI_PARAMETERS", "VM_SWAP", "VMDISK_MOUNT_OPTIONS"),
    *("PERSONALITY", "MYHOSTNAME", "definesnstuff", "repos", "VM_TYPE", "RUN_SHELL", "DO_STATISTICS"),
    *("TIME_PREINSTALL", "VM_WATCHDOG", "BUILDENGINE", "CCACHE", "ABUILD_TARGET"),
]

GOLDEN_INPUT: dict[str, str | list[str]] = {
    "RECIPEFILE": "foo.spec",
    "BUILD_JOBS": "4",
    "BUILD_ARCH": "x86_64:i686:i586:i486:i386",
    "RELEASE": "1.1",
    "REASON": "it's new",
    "DISTURL": "obs://build.example.org/home:me/openSUSE_Tumbleweed/abc-foo",
    "VM_SWAP": "/dev/vdb",
    "VMDISK_MOUNT_OPTIONS": "-o noatime",
    "MYHOSTNAME": "worker-1",
    "definesnstuff": ["--define", "_with_foo 1", "--define", "it's $(here)"],
    "repos": ["--repository", "/var/cache/repo"],
    "VM_TYPE": "kvm",
    "VM_WATCHDOG": "true",
}

GOLDEN_TEXT = """\
RECIPEFILE='foo.spec'
BUILD_JOBS='4'
BUILD_ARCH='x86_64:i686:i586:i486:i386'
BUILD_RPMS=''
BUILD_DIST=''
RELEASE='1.1'
BUILD_DEBUG=''
SIGNDUMMY=''
DO_LINT=''
DO_CHECKS='true'
NOROOTFORBUILD=''
CREATE_BASELIBS=''
REASON='it'\\''s new'
CHANGELOG=''
INCARNATION=''
DISTURL='obs://build.example.org/home:me/openSUSE_Tumbleweed/abc-foo'
DO_INIT='true'
KIWI_PARAMETERS=''
VM_SWAP='/dev/vdb'
VMDISK_MOUNT_OPTIONS='-o noatime'
PERSONALITY='0'
MYHOSTNAME='worker-1'
definesnstuff=('--define' '_with_foo 1' '--define' 'it'\\''s $(here)')
repos=('--repository' '/var/cache/repo')
VM_TYPE='kvm'
RUN_SHELL=''
DO_STATISTICS=''
TIME_PREINSTALL=''
VM_WATCHDOG='true'
BUILDENGINE=''
CCACHE=''
ABUILD_TARGET=''
"""


def bash() -> str:
    path = shutil.which("bash")
    assert path, "bash is needed to check that build.data sources correctly"
    return path


def source_with_bash(path: Path, variables: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
    """Source `path` in a real bash and print every variable back NUL-separated (arrays with a count)."""
    script = ['set -e; source "$1"']
    for name, value in variables.items():
        if isinstance(value, str):
            script.append(f'printf "%s\\0" "${name}"')
        else:
            script.append(f'printf "%s\\0" "${{#{name}[@]}}" "${{{name}[@]}}"')
    # cwd: a broken writer could let bash redirect into a file; keep that inside the test's folder
    argv = [bash(), "--norc", "--noprofile", "-c", "\n".join(script), "bash", path]
    out = run(argv, text=False, cwd=path.parent).stdout
    fields = out.split(b"\0")
    assert fields[-1] == b""
    fields.pop()
    result: dict[str, str | list[str]] = {}
    for name, value in variables.items():
        if isinstance(value, str):
            result[name] = fields.pop(0).decode("utf-8", "surrogateescape")
        else:
            count = int(fields.pop(0))
            result[name] = [fields.pop(0).decode("utf-8", "surrogateescape") for _ in range(count)]
    assert not fields
    return result


# --- the list of variables and the defaults ---------------------------------------------------


def test_the_variable_list_is_the_seeds_in_its_order() -> None:
    assert list(BUILD_DATA_VARIABLES) == SEED_VARIABLES
    assert set(ARRAY_VARIABLES) == {"definesnstuff", "repos"}


def test_fill_defaults_gives_obs_builds_defaults_and_drops_empty_optional_ones() -> None:
    filled = fill_defaults({"MYHOSTNAME": "h"})
    assert "VM_SWAP" not in filled  # obs-build: `test -n "$VM_SWAP" && echo ...`
    assert "VMDISK_MOUNT_OPTIONS" not in filled
    assert filled["DO_INIT"] == "true"
    assert filled["DO_CHECKS"] == "true"
    assert filled["PERSONALITY"] == "0"
    assert filled["definesnstuff"] == [] and filled["repos"] == []
    assert filled["RECIPEFILE"] == ""
    assert [n for n in SEED_VARIABLES if n in filled] == list(filled)
    assert fill_defaults({"VMDISK_MOUNT_OPTIONS": ""}).get("VMDISK_MOUNT_OPTIONS") is None
    assert fill_defaults({"VM_SWAP": "/dev/vdb"})["VM_SWAP"] == "/dev/vdb"


def test_fill_defaults_refuses_the_unresolved_mount_options_placeholder() -> None:
    # the guest runs `mount -n ${VMDISK_MOUNT_OPTIONS},remount,rw /`
    with pytest.raises(ValueError, match="must be resolved"):
        fill_defaults({"VMDISK_MOUNT_OPTIONS": "__default"})
    assert fill_defaults({"VMDISK_MOUNT_OPTIONS": "-o noatime"})["VMDISK_MOUNT_OPTIONS"] == "-o noatime"


def test_fill_defaults_uses_the_host_name_and_keeps_extra_variables_last() -> None:
    import socket

    filled = fill_defaults({"CLOUDBUILD_ID": "abc"})
    assert filled["MYHOSTNAME"] == socket.gethostname()
    assert list(filled)[-1] == "CLOUDBUILD_ID"


def test_fill_defaults_refuses_a_string_for_an_array_and_a_list_for_a_string() -> None:
    with pytest.raises(TypeError, match="repos is an array"):
        fill_defaults({"repos": "a b"})
    with pytest.raises(TypeError, match="RECIPEFILE is a str"):
        fill_defaults({"RECIPEFILE": ["a"]})


# --- the writer -------------------------------------------------------------------------------


def test_golden_text() -> None:
    assert format_build_data(fill_defaults(GOLDEN_INPUT)) == GOLDEN_TEXT


def test_golden_text_reads_back() -> None:
    assert read_build_data(GOLDEN_TEXT) == fill_defaults(GOLDEN_INPUT)


def test_write_build_data_writes_the_formatted_text(tmp_path: Path) -> None:
    path = tmp_path / "build.data"
    write_build_data(path, fill_defaults(GOLDEN_INPUT))
    assert path.read_text() == GOLDEN_TEXT
    assert load_build_data(path) == fill_defaults(GOLDEN_INPUT)


def test_a_value_with_a_newline_stays_inside_its_quotes() -> None:
    assert format_build_data({"A": "x\ny"}) == "A='x\ny'\n"


def test_empty_array_and_empty_string() -> None:
    assert format_build_data({"a": [], "B": ""}) == "a=()\nB=''\n"


@pytest.mark.parametrize(
    "variables",
    [{"A": "x\0y"}, {"a": ["ok", "x\0"]}],
    ids=["scalar", "array element"],
)
def test_a_nul_byte_is_refused(variables: dict[str, str | list[str]]) -> None:
    with pytest.raises(ValueError, match="NUL"):
        format_build_data(variables)


@pytest.mark.parametrize("name", ["", "1A", "A-B", "A B", "A=", "$(x)", "é"])
def test_a_bad_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a shell variable name"):
        format_build_data({name: "x"})


def test_writer_refuses_what_the_reader_would_refuse_as_too_large() -> None:
    with pytest.raises(ValueError, match="larger than"):
        format_build_data({"A": "x" * builddata.MAX_BYTES})
    with pytest.raises(ValueError, match="more than"):
        format_build_data({"a": ["x"] * (builddata.MAX_ARRAY_ITEMS + 1)})
    with pytest.raises(ValueError, match="more than"):
        format_build_data({f"V{i}": "" for i in range(builddata.MAX_VARIABLES + 1)})


def test_a_non_string_value_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        format_build_data({"A": 3})  # type: ignore[dict-item]


# --- the reader -------------------------------------------------------------------------------


def test_reader_accepts_obs_builds_double_quoted_array_elements() -> None:
    # obs-build's shellquote writes ` "elem"` with \ $ " ` backslash-escaped
    text = 'definesnstuff=( "--define" "a \\$b \\"c\\" \\\\ \\`")\n'
    assert read_build_data(text) == {"definesnstuff": ["--define", 'a $b "c" \\ `']}


def test_reader_accepts_quote_escapes_anywhere_in_a_word() -> None:
    assert read_build_data("A=\\'''\\''x'\n") == {"A": "''x"}


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("A=x\n", 1, "expected a quoted value"),
        ("A='x'", 1, "end of the line"),
        ("A='x' \n", 1, "end of the line"),
        ("A='x'; touch /tmp/x\n", 1, "end of the line"),
        ("A='x'\nB=$(id)\n", 2, "expected a quoted value"),
        ("A='x'\nB=\"$(id)\"\n", 2, "expected a quoted value"),
        ("A='x\n", 1, "unterminated single quote"),
        ("A=('x'\n", 1, "expected a space or )"),
        ("A=('x''y'z)\n", 1, "expected a space or )"),
        ('A=("$(id)")\n', 1, "unescaped $"),
        ('A=("`id`")\n', 1, "unescaped `"),
        ('A=("a\\nb")\n', 1, "backslash"),
        ('A=("abc)\n', 1, "unterminated double quote"),
        ("A='1'\nA='2'\n", 2, "set twice"),
        ("\n", 1, "expected NAME="),
        ("# comment\n", 1, "expected NAME="),
        ("export A='1'\n", 1, "expected NAME="),
        (" A='1'\n", 1, "expected NAME="),
        ("A ='1'\n", 1, "expected NAME="),
        ("A='1'\n\nB='2'\n", 2, "expected NAME="),
        ("1A='x'\n", 1, "expected NAME="),
        ("A='x'\r\n", 1, "end of the line"),
        ("A='x\0'\n", 1, "NUL"),
        ("A=('x'\t'y')\n", 1, "expected a space or )"),
        ("A=(\n'x')\n", 1, "expected a quoted value"),
        ("A='one\ntwo'\nB=x\n", 3, "expected a quoted value"),
    ],
)
def test_reader_refuses_anything_else_naming_the_line(text: str, line: int, why: str) -> None:
    with pytest.raises(ValueError, match=f"line {line}: .*{re.escape(why)}"):
        read_build_data(text)


def test_reader_is_bounded() -> None:
    with pytest.raises(ValueError, match="larger than"):
        read_build_data("A='" + "x" * builddata.MAX_BYTES + "'\n")
    many = "".join(f"V{i}=''\n" for i in range(builddata.MAX_VARIABLES + 1))
    with pytest.raises(ValueError, match="more than"):
        read_build_data(many)
    big_array = "a=(" + " ".join(["''"] * (builddata.MAX_ARRAY_ITEMS + 1)) + ")\n"
    with pytest.raises(ValueError, match="more than"):
        read_build_data(big_array)


def test_load_build_data_reads_at_most_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "build.data"
    path.write_bytes(b"A='" + b"x" * builddata.MAX_BYTES + b"'\n")
    with pytest.raises(ValueError, match="larger than"):
        load_build_data(path)


def test_the_empty_file_has_no_variables() -> None:
    assert read_build_data("") == {}


def test_golden_text_sources_in_bash(tmp_path: Path) -> None:
    path = tmp_path / "build.data"
    path.write_text(GOLDEN_TEXT)
    expected = fill_defaults(GOLDEN_INPUT)
    assert source_with_bash(path, expected) == expected


# --- property: bash and our reader agree with the writer, and nothing executes -----------------

# Characters a build.data value may hold: anything but NUL and lone surrogates, with the shell's
# special characters made likely.
_SPECIAL = st.sampled_from([*"'\"\\$`\n\r\t !();&|*?~#{}=\x01\x7f", "'\\''", "é", "€", "𝄞"])
_CHAR = st.characters(blacklist_categories=("Cs",), blacklist_characters="\0")
_TEXT = st.lists(st.one_of(_CHAR, _SPECIAL), max_size=30).map("".join)


def _value(canary: Path) -> st.SearchStrategy[str]:
    payloads = [
        f"$(touch {canary})",
        f"`touch {canary}`",
        f"'$(touch {canary})'",
        f"'; touch {canary}; '",
        f'"$(touch {canary})"',
        f"${{X:-$(touch {canary})}}",
        f"\\'$(touch {canary})",
        f"\n$(touch {canary})\n",
    ]
    return st.one_of(
        _TEXT, st.sampled_from(payloads), st.tuples(_TEXT, st.sampled_from(payloads), _TEXT).map("".join)
    )


_NAMES = st.one_of(
    st.sampled_from(SEED_VARIABLES),
    st.from_regex(r"\AX_[A-Za-z0-9_]{0,8}\Z"),
)


def _variables(canary: Path) -> st.SearchStrategy[dict[str, str | list[str]]]:
    value = _value(canary)
    return st.dictionaries(_NAMES, st.one_of(value, st.lists(value, max_size=5)), max_size=8)


CANARY_DIR = Path("/tmp/cloudbuild-test-builddata-canary")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_bash_sources_any_values_byte_identical_and_runs_nothing(tmp_path: Path, data: st.DataObject) -> None:
    canary = tmp_path / "canary"
    variables = data.draw(_variables(canary))
    path = tmp_path / "build.data"
    write_build_data(path, variables)
    assert source_with_bash(path, variables) == variables
    assert not canary.exists(), "sourcing build.data executed a command substitution"


@settings(max_examples=500, deadline=None)
@given(variables=_variables(CANARY_DIR / "never"))
def test_reader_reads_back_what_the_writer_wrote(variables: dict[str, str | list[str]]) -> None:
    text = format_build_data(variables)
    assert read_build_data(text) == variables
    assert list(read_build_data(text)) == list(variables)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("AB_=()'\"\\$` \nx")), max_size=40))
def test_reader_never_fails_with_anything_but_value_error(text: str) -> None:
    try:
        result = read_build_data(text)
    except ValueError:
        return
    # whatever it accepts is a faithful reading: writing it back and reading again is stable
    assert read_build_data(format_build_data(result)) == result
