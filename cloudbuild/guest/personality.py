"""The process personality (personality(2)): what `uname -m` says and how the kernel runs a build.

OBS workers start i586 builds under `linux32` on x86_64 machines; obs-build records that
personality in build.data (`PERSONALITY`) and its 2nd stage switches to it before the build, so
`uname -m` says i686 inside the machine too. `personality(0xffffffff)` asks without changing
anything (obs-build's `syscall(N, 0)` resets it as a side effect; we only ask).

STDLIB ONLY (ctypes): the guest agent switches the recipe's personality with `switch`.
"""

from __future__ import annotations

import ctypes
import os
import platform

QUERY = 0xFFFFFFFF
PER_LINUX32 = 0x0008
# kernels of these machines never say that a 32-bit personality is active: obs-build assumes one
ALWAYS_32 = ("ppc", "ppcle", "s390")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.personality.argtypes = [ctypes.c_ulong]
_libc.personality.restype = ctypes.c_int


def current() -> int:
    """This process' personality (0 when the kernel cannot tell)."""
    value = int(_libc.personality(QUERY))
    return 0 if value == -1 else value


def for_build_data(vm_type: str) -> int:
    """obs-build's PERSONALITY for build.data: ours, 0 in lxc (a container never switches)."""
    if vm_type == "lxc":
        return 0
    if platform.machine() in ALWAYS_32:
        return PER_LINUX32
    return current()


def switch(persona: int) -> None:
    """Switch this process (and what it execs) to `persona`; OSError when the kernel refuses."""
    if _libc.personality(ctypes.c_ulong(persona)) == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
