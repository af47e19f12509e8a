"""`cloudbuild build` argument checks: everything that can be refused is refused before any disk work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloudbuild.commands import build
from cloudbuild.errors import UsageError
from cloudbuild.options import parse


def recipe(tmp_path: Path, *, executable: bool = True) -> Path:
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    path = folder / "build.sh"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755 if executable else 0o644)
    return path


def options(tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "rootfs" / "bin").mkdir(parents=True, exist_ok=True)
    return [
        "--vm-type",
        "qemu",
        "--rootfs",
        str(tmp_path / "rootfs"),
        "--dest",
        str(tmp_path / "out"),
        *extra,
    ]


def test_exactly_one_executable_recipe(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="exactly one RECIPE"):
        build.run(parse(options(tmp_path)))
    with pytest.raises(UsageError, match="no such file"):
        build.run(parse([*options(tmp_path), str(tmp_path / "missing.sh")]))
    with pytest.raises(UsageError, match="not executable"):
        build.run(parse([*options(tmp_path), str(recipe(tmp_path, executable=False))]))


def test_dest_must_be_new_or_empty_and_rootfs_must_exist(tmp_path: Path) -> None:
    script = str(recipe(tmp_path))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old result")
    with pytest.raises(UsageError, match="must not exist or be an empty folder"):
        build.run(parse([*options(tmp_path), script]))
    (tmp_path / "out" / "old").unlink()
    with pytest.raises(UsageError, match="no such directory, tarball or image"):
        build.run(
            parse(
                [
                    "--vm-type",
                    "qemu",
                    "--rootfs",
                    str(tmp_path / "nope"),
                    "--dest",
                    str(tmp_path / "out"),
                    script,
                ]
            )
        )
    with pytest.raises(UsageError, match="--dest OUT is required"):
        build.run(parse(["--vm-type", "qemu", "--rootfs", str(tmp_path / "rootfs"), script]))


def test_work_folder_inside_the_recipe_folder_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = recipe(tmp_path)
    monkeypatch.setenv("TMPDIR", str(script.parent / "tmp"))
    with pytest.raises(UsageError, match="inside the recipe's folder"):
        build.run(parse([*options(tmp_path), str(script)]), echo=False)


def test_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert build.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cloudbuild build") and "--vm-memory" in out and "--build-timeout" in out


def test_shell_needs_a_console_and_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = str(recipe(tmp_path))
    with pytest.raises(UsageError, match="--shell: --vm-type lxc has no console here"):
        build.run(parse(["--vm-type", "lxc", *options(tmp_path)[2:], "--shell", script]))
    monkeypatch.setattr("sys.stdin", open(os.devnull))  # noqa: SIM115 - closed with the test
    with pytest.raises(UsageError, match="--shell-after-fail: stdin is no terminal"):
        build.run(parse([*options(tmp_path), "--shell-after-fail", script]))


def test_shell_options_reach_build_data() -> None:
    from cloudbuild.buildroot import stage

    def variables(*flags: str) -> dict[str, str | list[str]]:
        return stage.build_variables(parse(list(flags)), Path("/r/b.sh"), build_id="t", guest_swap=None)

    assert variables()["RUN_SHELL"] == "" and "RUN_SHELL_AFTER_FAIL" not in variables()
    assert variables("--shell")["RUN_SHELL"] == "1"
    assert variables("--shell-after-fail")["RUN_SHELL_AFTER_FAIL"] == "1"
