"""Fake `dasd_configure` and `lsdasd` over the fake z/VM state (tests/fakes/vmcp.py).

Setting a linked minidisk online attaches its image file to a real loop device and publishes it
the way the kernel does: `SYS/bus/ccw/devices/0.0.0301/block/dasdX` and a block device node
`DEV/dasdX1` (the first partition, which the backend formats). Offline undoes both.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from tests.fakes.vmcp import Refused


def _devnr(busid: str) -> str:
    if not busid.startswith("0.0.0") or len(busid) != 8:
        raise Refused(f"fake dasd_configure: bad bus id {busid}", 99)
    return busid[5:]


def _sysdir(state: dict[str, Any], busid: str) -> Path:
    return Path(state["sys_root"]) / "bus" / "ccw" / "devices" / busid


def _mounted(paths: set[str]) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[0] in paths for line in mounts if line.strip())


def dasd_configure(state: dict[str, Any], args: list[str]) -> str:
    if len(args) != 3 or args[1] not in ("0", "1") or args[2] != "0":
        raise Refused(f"fake dasd_configure: usage BUSID 0|1 0, not {args}", 99)
    busid, online = args[0], args[1] == "1"
    devnr = _devnr(busid)
    if online:
        if devnr not in state["local_links"]:
            raise Refused(f"dasd_configure: no device {busid} (not linked)", 1)
        if devnr in state["online"]:
            return ""
        user, disk = state["local_links"][devnr]
        image = state["minidisks"][user][disk]
        loop = subprocess.run(
            ["losetup", "--find", "--show", image], check=True, capture_output=True, text=True
        ).stdout.strip()
        used = {entry["block"] for entry in state["online"].values()}
        block = next(f"dasd{c}" for c in "bcdefghijklmnopqrstuvwxyz" if f"dasd{c}" not in used)
        rdev = os.stat(loop).st_rdev
        node = Path(state["dev_root"]) / f"{block}1"
        node.parent.mkdir(parents=True, exist_ok=True)
        os.mknod(node, 0o600 | 0o060000, rdev)
        (_sysdir(state, busid) / "block" / block).mkdir(parents=True)
        state["online"][devnr] = {"loop": loop, "block": block}
        return ""
    entry = state["online"].get(devnr)
    if entry is None:
        return ""
    node = Path(state["dev_root"]) / f"{entry['block']}1"
    if _mounted({str(node), entry["loop"]}):
        raise Refused(f"dasd_configure: {busid} is in use (mounted)", 1)
    node.unlink()
    (_sysdir(state, busid) / "block" / entry["block"]).rmdir()
    subprocess.run(["losetup", "-d", entry["loop"]], check=True, capture_output=True)
    del state["online"][devnr]
    return ""


def lsdasd(state: dict[str, Any], args: list[str]) -> str:
    lines = ["Bus-ID    Status    Name      Device  Type  BlkSz  Size      Blocks"]
    for devnr, entry in state["online"].items():
        if not args or args[0] == devnr:
            lines.append(
                f"0.0.0{devnr}  active    {entry['block']}     94:0    ECKD  4096   1024MB    262144"
            )
    return "\n".join(lines)


def cleanup(state: dict[str, Any]) -> None:
    """Tests' safety net: detach any loop device the fake left (a test that failed halfway)."""
    for entry in state["online"].values():
        subprocess.run(["losetup", "-d", entry["loop"]], check=False, capture_output=True)
    state["online"] = {}
