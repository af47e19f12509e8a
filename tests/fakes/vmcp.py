"""Fake z/VM for tests: `vmcp`, `iucvconn`, `zipl` (here) and `dasd_configure`, `lsdasd` (dasd.py).

State lives in one JSON file so every fake process sees the same machine:

    minidisks   {"WORKER": {"0150": "/path/root.img", "0250": "/path/swap.img"}}
    logged_on   {"WORKER": false}
    ipled       {"WORKER": false}
    worker_links {"WORKER": ["0150"]}         minidisks linked into the worker
    local_links {"0301": ["WORKER", "0150"]}  minidisks linked here at a local device number
    online      {"0301": {"loop": "/dev/loop3", "block": "dasdb"}}
    memory      {"WORKER": "512M"}
    guest       guestplay spec run when the worker is IPLed
    console     what the guest printed (iucvconn plays it back)
    sys_root, dev_root   the fake sysfs / dev folders the backend reads
    calls       [[tool, argv...], ...]   every call, in order
    errors      [message, ...]           every refused call

Wrong order is refused the way z/VM or the kernel would refuse it, and recorded: linking a
minidisk here while the worker has it, linking it into the worker while we have it, detaching a
device that is still online, taking a mounted DASD offline, IPL without both disks, and
detaching the controller's own root (0150) is recorded as a fatal error.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

STATE_ENV = "FAKE_ZVM_STATE"
LOCAL_ROOT = ("150", "0150")


class Refused(Exception):
    def __init__(self, message: str, rc: int = 1):
        super().__init__(message)
        self.rc = rc


def new_state(sys_root: Path, dev_root: Path, minidisks: dict[str, dict[str, str]]) -> dict[str, Any]:
    return {
        "minidisks": minidisks,
        "logged_on": {w: False for w in minidisks},
        "ipled": {w: False for w in minidisks},
        "worker_links": {w: [] for w in minidisks},
        "local_links": {},
        "online": {},
        "memory": {},
        "guest": {"status": 0, "files": {"results/ok.txt": "ok\n"}},
        "console": "",
        "guest_seen": None,
        "sys_root": str(sys_root),
        "dev_root": str(dev_root),
        "calls": [],
        "errors": [],
    }


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def _user(state: dict[str, Any], name: str) -> str:
    user = name.upper()
    if user not in state["minidisks"]:
        raise Refused(f"HCPCQU003E Invalid option - {name}", 3)
    return user


def _logon(state: dict[str, Any], user: str) -> None:
    """Logging on links the minidisks of the user directory into the worker."""
    state["logged_on"][user] = True
    state["ipled"][user] = False
    state["worker_links"][user] = sorted(state["minidisks"][user])


def _logoff(state: dict[str, Any], user: str) -> None:
    state["logged_on"][user] = False
    state["ipled"][user] = False
    state["worker_links"][user] = []


def _send(state: dict[str, Any], user: str, args: list[str]) -> str:
    if not state["logged_on"][user]:
        raise Refused(f"HCPSND045E {user} not logged on", 45)
    words = [a.lower() for a in args]
    if words[:1] != ["cp"]:
        raise Refused(f"fake vmcp: unknown send {args}", 99)
    if words[1:3] == ["define", "storage"] and len(args) == 4:
        if state["ipled"][user]:
            raise Refused("fake vmcp: define storage after IPL would reset the running build", 99)
        state["memory"][user] = args[3]
        return ""
    if words[1] == "link" and args[2] == "*" and len(args) == 5 and args[3] == args[4]:
        disk = args[3]
        if disk not in state["minidisks"][user]:
            raise Refused(f"HCPLNM113E {user} {disk} not in CP directory", 113)
        for devnr, (owner, linked) in state["local_links"].items():
            if owner == user and linked == disk:
                raise Refused(f"HCPLNM104E {user} {disk} is linked R/W by the controller as {devnr}", 104)
        if disk in state["worker_links"][user]:
            raise Refused(f"HCPLNK006E device {disk} already defined", 6)
        state["worker_links"][user].append(disk)
        return ""
    if words[1] == "detach" and len(args) == 3:
        disk = args[2]
        if disk not in state["worker_links"][user]:
            raise Refused(f"HCPDTV040E Device {disk} does not exist", 40)
        state["worker_links"][user].remove(disk)
        return ""
    if words[1] == "ipl" and len(args) == 3:
        disk = args[2]
        mine = state["minidisks"][user]
        missing = [d for d in mine if d not in state["worker_links"][user]]
        if missing:
            raise Refused(f"fake vmcp: IPL with minidisks {missing} not linked into {user}", 99)
        state["ipled"][user] = True
        root, swap = (Path(mine[d]) for d in sorted(mine))
        if disk != sorted(mine)[0]:
            raise Refused(f"fake vmcp: IPL from {disk}, which is not the root minidisk", 99)
        from tests.fakes import guestplay

        state["guest_seen"] = guestplay.play(root, swap, state["guest"])
        state["console"] = state["guest"].get("console", "build finished\n")
        _logoff(state, user)  # the guest powered off; vmpoff=LOGOFF logs it off
        return ""
    raise Refused(f"fake vmcp: unknown CP command {args}", 99)


def vmcp(state: dict[str, Any], args: list[str]) -> str:
    if not args:
        raise Refused("fake vmcp: no command", 99)
    cmd = args[0].lower()
    if cmd in ("q", "query"):
        if len(args) == 3 and args[1].lower() in ("v", "virtual"):
            if args[2] in state["local_links"]:
                return f"DASD {args[2]} 3390 LINKED R/W"
            raise Refused(f"HCPQVD040E Device {args[2]} does not exist", 40)
        user = _user(state, args[1])
        if state["logged_on"][user]:
            return f"{user}   - DSC"
        raise Refused(f"HCPCQU045E {user} not logged on", 45)
    if cmd == "xautolog":
        user = _user(state, args[1])
        if state["logged_on"][user]:
            raise Refused(f"HCPXAU... {user} already logged on", 1)
        _logon(state, user)
        return "Command accepted"
    if cmd == "force":
        user = _user(state, args[1])
        if not state["logged_on"][user]:
            raise Refused(f"HCPCQU045E {user} not logged on", 45)
        _logoff(state, user)
        return f"USER {user} FORCED BY CONTROLLER"
    if cmd == "link" and len(args) == 5:
        user, disk, devnr, mode = _user(state, args[1]), args[2], args[3], args[4]
        if mode != "MW":
            raise Refused(f"fake vmcp: link mode {mode} (obs-build links MW)", 99)
        if disk not in state["minidisks"][user]:
            raise Refused(f"HCPLNM113E {user} {disk} not in CP directory", 113)
        if devnr in state["local_links"]:
            raise Refused(f"HCPLNK006E device {devnr} already defined", 6)
        if disk in state["worker_links"][user]:
            raise Refused(f"HCPLNM104E {user} {disk} is linked R/W by {user} (detach it there first)", 104)
        state["local_links"][devnr] = [user, disk]
        return ""
    if cmd == "detach" and len(args) == 2:
        devnr = args[1]
        if devnr in LOCAL_ROOT:
            state.setdefault("fatal", []).append("detached the controller's own root")
            raise Refused("fake vmcp: you just detached your own root disk", 99)
        if devnr not in state["local_links"]:
            raise Refused(f"HCPDTV040E Device {devnr} does not exist", 40)
        if devnr in state["online"]:
            raise Refused(f"fake vmcp: detach of {devnr} while the DASD is still online", 99)
        del state["local_links"][devnr]
        return f"DASD {devnr} DETACHED"
    if cmd == "send" and len(args) >= 3:
        return _send(state, _user(state, args[1]), args[2:])
    raise Refused(f"fake vmcp: unknown command {args}", 99)


def iucvconn(state: dict[str, Any], args: list[str]) -> str:
    if len(args) != 2 or args[1] != "lnxhvc0":
        raise Refused(f"fake iucvconn: usage iucvconn USER lnxhvc0, not {args}", 99)
    _user(state, args[0])
    return str(state["console"])


def zipl(state: dict[str, Any], args: list[str]) -> str:
    want = {"-t", "-i", "-r", "--parameters"}
    given = set(args[0::2])
    if given != want or len(args) != 8:
        raise Refused(f"fake zipl: unexpected arguments {args}", 99)
    target = Path(args[args.index("-t") + 1])
    if not target.is_dir():
        raise Refused(f"zipl: target {target} is not a directory", 1)
    (target / "bootmap").write_text("fake boot record\n")
    return "Done."


def main(tool: str, handler: Callable[[dict[str, Any], list[str]], str], argv: list[str]) -> int:
    import os

    path = Path(os.environ[STATE_ENV])
    state = load(path)
    state["calls"].append([tool, *argv])
    try:
        out = handler(state, argv)
        rc = 0
    except Refused as exc:
        if argv[:1] not in (["q"], ["query"]):  # "not logged on" / "does not exist" are answers
            state["errors"].append(f"{tool} {' '.join(argv)}: {exc}")
        sys.stderr.write(f"{exc}\n")
        out, rc = "", exc.rc
    save(path, state)
    if out:
        sys.stdout.write(out if out.endswith("\n") else out + "\n")
    return rc


TOOLS: dict[str, str] = {
    "vmcp": "tests.fakes.vmcp:vmcp",
    "iucvconn": "tests.fakes.vmcp:iucvconn",
    "zipl": "tests.fakes.vmcp:zipl",
    "dasd_configure": "tests.fakes.dasd:dasd_configure",
    "lsdasd": "tests.fakes.dasd:lsdasd",
}


def install(bin_dir: Path, state_path: Path, repo: Path, *, tools: dict[str, str] = TOOLS) -> None:
    """Write the fake executables into `bin_dir` (put it first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, target in tools.items():
        module, func = target.split(":")
        script = bin_dir / name
        script.write_text(
            f"#!{sys.executable}\n"
            "import os, sys\n"
            f"sys.path.insert(0, {str(repo)!r})\n"
            f"os.environ.setdefault({STATE_ENV!r}, {str(state_path)!r})\n"
            "from tests.fakes.vmcp import main\n"
            f"from {module} import {func} as handler\n"
            f"sys.exit(main({name!r}, handler, sys.argv[1:]))\n"
        )
        script.chmod(0o755)
