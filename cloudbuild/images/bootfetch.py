"""Guest side of the cloud images: at every boot, fetch the user data and run the boot hook.

Installed into the builder image (stdlib only, like the guest agent) and started by
`cloudbuild-boot-hook.service`. Where the user data comes from:
- `--cloud ec2`: IMDSv2, a session token first (PUT /latest/api/token), then
  GET /latest/user-data with that token. IMDSv1 is never used.
- `--cloud openstack`: the config drive (a filesystem labelled `config-2`,
  openstack/latest/user_data), else the metadata service (GET /openstack/latest/user_data).

The user data runs only when one of its first lines is a known marker (one a line in
`--markers`, written when the image is built, from the clouds' own hook generators); anything else is logged and
ignored, so an image booted by hand or with foreign user data just idles. Everything fetched is
the cloud's word, but nothing in it is parsed here beyond the marker check.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

METADATA_HOST = "169.254.169.254"
TOKEN_TTL = "21600"
MARKER_LINES = 3  # a marker counts only among the first lines (after the #! line)
CONFIG_DRIVE_LABEL = "config-2"
HOOK_PATH = Path("/var/lib/cloudbuild/boot-hook")  # /run is noexec
MARKERS_FILE = Path("/etc/cloudbuild/hook-markers")


class NotThere(Exception):
    """The source answered that there is no user data (404), or has none: no point in retrying."""


def say(message: str) -> None:
    print(f"cloudbuild-boot-hook: {message}", file=sys.stderr, flush=True)


def _request(method: str, path: str, headers: dict[str, str], *, host: str, port: int) -> bytes:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request(method, path, headers=headers)
        reply = conn.getresponse()
        body = reply.read(16 * 1024 * 1024 + 1)
    finally:
        conn.close()
    if reply.status == 404:
        raise NotThere(f"{method} {path}: 404")
    if reply.status != 200:
        raise OSError(f"{method} {path}: HTTP {reply.status}")
    if len(body) > 16 * 1024 * 1024:
        raise OSError(f"{method} {path}: more than 16 MiB")
    return body


def ec2_user_data(host: str = METADATA_HOST, port: int = 80) -> bytes:
    token = (
        _request(
            "PUT",
            "/latest/api/token",
            {"X-aws-ec2-metadata-token-ttl-seconds": TOKEN_TTL},
            host=host,
            port=port,
        )
        .decode("ascii", "replace")
        .strip()
    )
    return _request("GET", "/latest/user-data", {"X-aws-ec2-metadata-token": token}, host=host, port=port)


def config_drive_user_data(dev_root: Path = Path("/dev/disk/by-label")) -> bytes | None:
    """The user data on the config drive, or None when there is no config drive."""
    drive = dev_root / CONFIG_DRIVE_LABEL
    if not drive.exists():
        return None
    with tempfile.TemporaryDirectory(prefix="config-drive-") as mnt:
        subprocess.run(["mount", "-o", "ro", os.fspath(drive), mnt], check=True)
        try:
            path = Path(mnt) / "openstack" / "latest" / "user_data"
            return path.read_bytes() if path.is_file() else b""
        finally:
            subprocess.run(["umount", mnt], check=False)


def openstack_user_data(host: str = METADATA_HOST, port: int = 80) -> bytes:
    on_drive = config_drive_user_data()
    if on_drive is not None:
        say("user data from the config drive")
        return on_drive
    return _request("GET", "/openstack/latest/user_data", {}, host=host, port=port)


def fetch_with_deadline(fetch: Callable[[], bytes], seconds: float) -> bytes | None:
    """Ask until the source answers (the network may come up after us) or the deadline passes.
    None: there is no user data (404) or the deadline passed."""
    deadline = time.monotonic() + seconds
    pause = 0.2
    while True:
        try:
            return fetch()
        except NotThere as exc:
            say(f"no user data ({exc})")
            return None
        except (OSError, http.client.HTTPException, subprocess.CalledProcessError) as exc:
            if time.monotonic() + pause > deadline:
                say(f"giving up on the user data: {exc}")
                return None
            time.sleep(pause)  # guest side is stdlib only: no tenacity here (like the guest agent)
            pause = min(pause * 2, 2.0)


def has_marker(user_data: bytes, markers: Sequence[str]) -> bool:
    lines = user_data.decode("utf-8", "replace").splitlines()
    if not lines or not lines[0].startswith("#!"):
        return False
    head = [line.strip() for line in lines[1 : 1 + MARKER_LINES]]
    return any(marker in head for marker in markers)


def run_hook(user_data: bytes, path: Path | None = None) -> int:
    path = path or HOOK_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(user_data)
    path.chmod(0o700)
    return subprocess.run([os.fspath(path)], check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cloudbuild-boot-hook", description=__doc__)
    p.add_argument("--cloud", choices=("ec2", "openstack"), required=True)
    p.add_argument("--markers", type=Path, default=MARKERS_FILE, help="file: the lines that mark a hook")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the metadata source")
    p.add_argument("--metadata", default=f"{METADATA_HOST}:80", help="host:port of the metadata service")
    args = p.parse_args(argv)
    host, _, port = args.metadata.rpartition(":")
    fetch = ec2_user_data if args.cloud == "ec2" else openstack_user_data
    user_data = fetch_with_deadline(lambda: fetch(host, int(port)), args.wait)
    if user_data is None:
        return 0
    markers = [line for line in args.markers.read_text().splitlines() if line.strip()]
    if not has_marker(user_data, markers):
        say("user data carries no cloudbuild hook marker: nothing to run")
        return 0
    say("running the boot hook")
    return run_hook(user_data)


if __name__ == "__main__":
    sys.exit(main())
