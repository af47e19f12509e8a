"""The builder image holds only part of this package: the agent and the boot unit must import
from that part alone, lazy imports inside functions included (a missing module showed up only
inside a booted image before)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import cloudbuild
from cloudbuild.images import content

PACKAGE = Path(cloudbuild.__file__).parent


def guest_imports() -> set[str]:
    """Every cloudbuild module the guest side names, at any depth of the agent's own modules."""
    sources = [*(PACKAGE / "guest").glob("*.py"), PACKAGE / "images" / "bootfetch.py"]
    names: set[str] = {"cloudbuild.guest.agent", "cloudbuild.images.bootfetch"}
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cloudbuild"):
                names.add(node.module)
                names.update(
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if (PACKAGE.parent / node.module.replace(".", "/") / f"{a.name}.py").exists()
                )
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.startswith("cloudbuild"))
    return names


def test_the_guest_code_imports_from_what_the_image_holds(tmp_path: Path) -> None:
    content.copy_guest_package(tmp_path, content.GUEST_MODULES, "/usr/lib/cloudbuild")
    copy = tmp_path / "usr/lib/cloudbuild"
    code = (
        "import sys, importlib; sys.path[:0] = [sys.argv[1]]; import cloudbuild;"
        "assert cloudbuild.__file__.startswith(sys.argv[1]), cloudbuild.__file__;"
        "[importlib.import_module(name) for name in sys.argv[2:]]"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, str(copy), *sorted(guest_imports())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "cloudbuild.buildroot.builddata" in guest_imports()  # the lazy one is seen
