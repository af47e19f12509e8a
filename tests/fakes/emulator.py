"""A fake `--emulator-script`: records how it was called and plays the guest on the images.

State (JSON at $FAKE_EMU_STATE): `guest` (a guestplay spec; `"hang": true` keeps the "machine"
running with the root image open until it is killed, `"exit": N` fails the emulator, `"boot":
true` boots the image's own /sbin/init as an emulator's kernel would: mounted as the root of
fresh mount, pid, uts, ipc and network namespaces, the init as their PID 1), `calls`
([{argv, cwd}]), `guest_seen`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

STATE_ENV = "FAKE_EMU_STATE"


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def main(argv: list[str]) -> int:
    path = Path(os.environ[STATE_ENV])
    state = load(path)
    state["calls"].append({"argv": argv, "cwd": os.getcwd()})
    save(path, state)
    if len(argv) != 2:
        sys.stderr.write(f"fake emulator: expected ROOT SWAP, got {argv}\n")
        return 2
    root, swap = Path(argv[0]), Path(argv[1]) if argv[1] else None
    spec = state["guest"]
    if spec.get("exit"):
        return int(spec["exit"])
    if spec.get("hang"):
        os.open(root, os.O_RDWR)  # like a real emulator: the image stays open while it runs
        sys.stdout.write("emulator running\n")
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        while True:
            signal.pause()
    if spec.get("boot"):
        return boot(root)
    from tests.fakes import guestplay

    seen = guestplay.play(root, swap, spec)
    state = load(path)
    state["guest_seen"] = seen
    save(path, state)
    sys.stdout.write(spec.get("console", "emulated build finished\n"))
    return 0


def boot(root: Path) -> int:
    """Run the image's /sbin/init as PID 1 with the image as `/`; its power-off ends the namespaces."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fake-emulator-") as mnt:
        boot_script = f'mount -o loop "{root}" "{mnt}" && exec chroot "{mnt}" /sbin/init'
        argv = ["unshare", "--mount", "--uts", "--ipc", "--net", "--pid", "--fork", "--kill-child"]
        machine = subprocess.Popen([*argv, "sh", "-c", boot_script])

        def stop(*_: object) -> None:  # as a real emulator dies on SIGTERM: unshare would forward
            machine.kill()  # it to the init, which ignores it; SIGKILL ends the namespaces
            machine.wait()
            sys.exit(143)

        signal.signal(signal.SIGTERM, stop)
        code = machine.wait()
    # an init that powers off a pid namespace is ended by SIGINT (reboot(2)): the machine stopped
    return 0 if code in (0, -2, 130) else code


def install(script: Path, state_path: Path, repo: Path) -> None:
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, sys\n"
        f"sys.path.insert(0, {str(repo)!r})\n"
        f"os.environ.setdefault({STATE_ENV!r}, {str(state_path)!r})\n"
        "from tests.fakes.emulator import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    script.chmod(0o755)
