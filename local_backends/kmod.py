"""Kernel modules of the guest: resolve names to files in load order (modules.dep), decompress them.

Debian builds virtio and ext4 as modules, so the initramfs must carry them. Dependencies come
from `modules.dep` (what `depmod` wrote); a module listed in `modules.builtin` needs no file.
Compressed modules (.ko.xz, .ko.zst, .ko.gz) are decompressed here so that busybox `insmod`
loads them whatever the guest kernel's own decompression support.
"""

from __future__ import annotations

import lzma
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from cloudbuild.errors import HostBroken
from cloudbuild.runner import run

_SUFFIXES = (".ko.zst", ".ko.xz", ".ko.gz", ".ko")


def module_name(path: str) -> str:
    """`kernel/fs/ext4/ext4.ko.xz` -> `ext4` (dashes and underscores are the same to the kernel)."""
    base = path.rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


@dataclass(frozen=True)
class ModuleIndex:
    directory: Path  # /lib/modules/RELEASE
    deps: dict[str, tuple[str, tuple[str, ...]]]  # name -> (relative path, relative dependency paths)
    builtin: frozenset[str]
    # modules.softdep `pre:` names (e.g. libcrc32c needs a crc32c implementation loaded first)
    softdeps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # alias -> module names

    @classmethod
    def load(cls, directory: Path) -> ModuleIndex:
        dep_file = directory / "modules.dep"
        try:
            text = dep_file.read_text()
        except OSError as exc:
            raise HostBroken(
                f"{dep_file}: {exc.strerror}: the guest kernel's modules are not installed (run depmod?)"
            ) from exc
        deps: dict[str, tuple[str, tuple[str, ...]]] = {}
        for line in text.splitlines():
            path, sep, rest = line.partition(":")
            if sep:
                deps[module_name(path)] = (path, tuple(rest.split()))
        builtin: set[str] = set()
        builtin_file = directory / "modules.builtin"
        if builtin_file.exists():
            builtin = {module_name(line) for line in builtin_file.read_text().split()}
        softdeps: dict[str, tuple[str, ...]] = {}
        softdep_file = directory / "modules.softdep"
        if softdep_file.exists():
            for line in softdep_file.read_text().splitlines():
                words = line.split()
                if len(words) < 3 or words[0] != "softdep":
                    continue
                pre: list[str] = []
                for word in words[2:]:
                    if word == "post:":
                        break
                    if word != "pre:":
                        pre.append(word)
                softdeps[module_name(words[1])] = tuple(pre)
        aliases: dict[str, tuple[str, ...]] = {}
        alias_file = directory / "modules.alias"
        if alias_file.exists() and softdeps:
            wanted = {name for names in softdeps.values() for name in names}
            for line in alias_file.read_text().splitlines():
                words = line.split()
                if len(words) == 3 and words[0] == "alias" and words[1] in wanted:
                    aliases[words[1]] = (*aliases.get(words[1], ()), module_name(words[2]))
        return cls(directory, deps, frozenset(builtin), softdeps, aliases)

    def _lookup(self, name: str) -> str | None:
        """A module name for `name` (itself, or what an alias like `crypto-crc32c` stands for);
        the generic implementation of an alias is preferred (it needs no CPU feature)."""
        key = name.replace("-", "_")
        if key in self.deps or key in self.builtin:
            return key
        candidates = self.aliases.get(name, ())
        for candidate in sorted(candidates, key=lambda c: not c.endswith("_generic")):
            if candidate in self.deps or candidate in self.builtin:
                return candidate
        return None

    def resolve(self, names: list[str] | tuple[str, ...]) -> list[str]:
        """Relative paths of `names` and their dependencies, each dependency before its users."""
        ordered: list[str] = []

        def visit(path: str, stack: tuple[str, ...]) -> None:
            if path in ordered or path in stack:
                return
            name = module_name(path)
            for soft in self.softdeps.get(name, ()):  # soft pre-dependencies, when they resolve
                found = self._lookup(soft)
                if found is not None and found in self.deps:
                    visit(self.deps[found][0], (*stack, path))
            entry = self.deps.get(name)
            dependencies = entry[1] if entry else ()
            # modules.dep lists the deepest dependency last: load from the end
            for dependency in reversed(dependencies):
                visit(dependency, (*stack, path))
            ordered.append(path)

        for name in names:
            key = name.replace("-", "_")
            if key in self.deps:
                visit(self.deps[key][0], ())
            elif key not in self.builtin:
                raise HostBroken(
                    f"kernel module {name} is neither in {self.directory}/modules.dep nor built in: "
                    "the guest kernel cannot mount its disks"
                )
        return ordered


def module_bytes(path: Path) -> bytes:
    """The module file, decompressed."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    if name.endswith(".ko.zst"):
        out: bytes = run(["zstd", "-dc", path], text=False, timeout=60).stdout
        return out
    return data
