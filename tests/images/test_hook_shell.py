"""The EC2 boot hook is a shell script: run it through a real /bin/sh (the image runs it so), with
the by-id folder moved into tmp and the agent replaced by an echo."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cloudbuild.images import clouds

ROOT, SWAP = "vol-0123456789abcdef0", "vol-0fedcba9876543210"


def test_the_ec2_hook_finds_its_volumes_by_serial_under_a_real_shell(tmp_path: Path) -> None:
    by_id = tmp_path / "by-id"
    by_id.mkdir()
    for volume, dev in ((ROOT, "nvme1n1"), (SWAP, "nvme2n1")):
        (tmp_path / dev).write_text("")
        (by_id / f"nvme-Amazon_Elastic_Block_Store_{volume.replace('-', '')}").symlink_to(tmp_path / dev)
    hook = clouds.ec2_user_data(build_id="b1", root=ROOT, swap=SWAP, device_timeout=2)
    hook = hook.replace("/dev/disk/by-id/", f"{by_id}/").replace("exec python3", "echo python3")
    done = subprocess.run(["/bin/sh", "-c", hook], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "python3", "-m", "cloudbuild.guest.agent", "--root", str(tmp_path / "nvme1n1"), "--swap", str(tmp_path / "nvme2n1"),
    ]  # fmt: skip
