"""Fake `xl` (and `xm`): records every call and the domain config, plays the guest on the disks.

State (JSON at $FAKE_XL_STATE):
    domains  {"build_x": pid}     running domains (the pid of the `xl create -c` that follows it)
    guest    guestplay spec; `"hang": true` keeps the domain running until `xl destroy`
    creates  [{"argv": [...], "config": "<file text>", "disks": [...], "extra": "..."}]
    calls    [[tool, argv...]]
    errors   ["..."]

`create -c CONF name=... disk=... extra=...` refuses a domain that exists, checks the config
file has what a PV guest needs, then (like `xl create -c`) prints the console and returns when
the domain is gone: on power-off (the guest played, status on swap) or on `destroy`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

STATE_ENV = "FAKE_XL_STATE"
REQUIRED = ("kernel", "memory", "root", "extra", "on_poweroff", "on_reboot", "on_crash")


def new_state() -> dict[str, Any]:
    return {
        "domains": {},
        "guest": {"status": 0, "files": {"results/ok.txt": "ok\n"}},
        "creates": [],
        "calls": [],
        "errors": [],
    }


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


class Refused(Exception):
    pass


def parse_config(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        match = re.fullmatch(r'(\w+) = (".*"|\d+)', line.strip())
        if not match:
            raise Refused(f"config: cannot parse line {line!r}")
        values[match.group(1)] = match.group(2).strip('"')
    return values


def parse_create(tool: str, args: list[str]) -> tuple[Path, str, list[str], str]:
    if args[:1] != ["-c"] or len(args) < 4:
        raise Refused(f"{tool} create: expected -c CONFIG name=... disk=... extra=..., got {args}")
    config = Path(args[1])
    name, disks, extra = "", [], ""
    for item in args[2:]:
        key, _, value = item.partition("=")
        if key == "name":
            name = value.strip('"')
        elif key == "disk" and tool == "xl":
            if not (value.startswith("[ ") and value.endswith(" ]")):
                raise Refused(f'xl: disk list {value!r} is not [ "...", ... ]')
            disks += re.findall(r'"([^"]*)"', value)
        elif key == "disk":
            disks.append(value)
        elif key == "extra":
            extra = value.strip('"') if tool == "xl" else value
        else:
            raise Refused(f"{tool} create: unknown item {item!r}")
    return config, name, disks, extra


def disk_path(spec: str) -> Path:
    kind, _, rest = spec.partition(":")
    path, _device, mode = rest.split(",")
    if kind not in ("file", "phy") or mode != "w":
        raise Refused(f"bad disk spec {spec}")
    if (kind == "phy") != path.startswith("/dev/"):
        raise Refused(f"disk spec {spec}: phy: is for block devices, file: for images")
    return Path(path)


def create(tool: str, path: Path, state: dict[str, Any], args: list[str]) -> int:
    config_file, name, disks, extra = parse_create(tool, args)
    if name in state["domains"]:
        raise Refused(f"domain '{name}' already exists")
    config_text = config_file.read_text()
    config = parse_config(config_text)
    missing = [key for key in REQUIRED if key not in config]
    if missing:
        raise Refused(f"config lacks {missing}")
    for key in ("kernel", "ramdisk"):
        if key in config and not Path(config[key]).is_file():
            raise Refused(f"{key} {config[key]} does not exist")
    if "init=" not in extra:
        raise Refused("extra= has no init=")
    state["creates"].append(
        {"argv": [tool, "create", *args], "config": config_text, "disks": disks, "extra": extra}
    )
    spec = state["guest"]
    state["domains"][name] = os.getpid()
    save(path, state)
    if spec.get("hang"):
        sys.stdout.write(spec.get("console", "guest running\n"))
        sys.stdout.flush()

        def destroyed(signum: int, frame: object) -> None:
            sys.exit(0)  # the console closes when the domain is destroyed

        signal.signal(signal.SIGTERM, destroyed)
        while True:
            signal.pause()
    from tests.fakes import guestplay

    paths = [disk_path(d) for d in disks]
    seen = guestplay.play(paths[0], paths[1] if len(paths) > 1 else None, spec)
    state = load(path)
    state["guest_seen"] = seen
    state["domains"].pop(name, None)  # on_poweroff = destroy
    save(path, state)
    sys.stdout.write(spec.get("console", "build finished\n"))
    return 0


def main(tool: str, argv: list[str]) -> int:
    path = Path(os.environ[STATE_ENV])
    state = load(path)
    state["calls"].append([tool, *argv])
    save(path, state)
    try:
        if argv[:1] == ["list"] and len(argv) == 2:
            if argv[1] in state["domains"]:
                print(f"Name ID Mem VCPUs State Time(s)\n{argv[1]} 7 512 1 -b---- 0.1")
                return 0
            raise Refused(f"{tool}: invalid domain identifier '{argv[1]}'")
        if argv[:1] == ["destroy"] and len(argv) == 2:
            pid = state["domains"].pop(argv[1], None)
            if pid is None:
                raise Refused(f"{tool}: invalid domain identifier '{argv[1]}'")
            save(path, state)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            return 0
        if argv[:1] == ["create"]:
            return create(tool, path, state, argv[1:])
        raise Refused(f"fake {tool}: unknown command {argv}")
    except Refused as exc:
        state = load(path)
        state["errors"].append(str(exc))
        save(path, state)
        sys.stderr.write(f"{exc}\n")
        return 1


def install(bin_dir: Path, state_path: Path, repo: Path, *, tools: tuple[str, ...] = ("xl",)) -> None:
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        script = bin_dir / tool
        script.write_text(
            f"#!{sys.executable}\n"
            "import os, sys\n"
            f"sys.path.insert(0, {str(repo)!r})\n"
            f"os.environ.setdefault({STATE_ENV!r}, {str(state_path)!r})\n"
            "from tests.fakes.xl import main\n"
            f"sys.exit(main({tool!r}, sys.argv[1:]))\n"
        )
        script.chmod(0o755)
