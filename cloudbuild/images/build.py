"""`cloudbuild image build`: debootstrap a tree, make it a builder or worker, write the disk."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cloudbuild import log as cblog
from cloudbuild.images import content, disk, tree
from cloudbuild.runner import run

log = cblog.get_logger(__name__)


@dataclass(frozen=True)
class ImageSpec:
    kind: str  # builder (the worker image is not built yet: docs/images.md)
    cloud: str  # ec2 | openstack
    suite: str = "bookworm"
    mirror: str = ""  # empty: the host's apt mirror
    fmt: str = "raw"  # raw | qcow2


def base_tree(target: Path, spec: ImageSpec, mirror: str, cache: Path | None) -> None:
    """debootstrap, or unpack the tarball of an earlier identical debootstrap from `cache`."""
    wanted = sorted({*tree.BASE_PACKAGES, *content.packages(spec.kind, spec.cloud)})
    key = hashlib.sha256(f"{spec.suite} {mirror} {' '.join(wanted)}".encode()).hexdigest()[:16]
    tarball = cache / f"debootstrap-{spec.suite}-{key}.tar" if cache else None
    if tarball is not None and tarball.exists():
        log.info("base tree from cache", tarball=str(tarball))
        run(["tar", "-C", target, "--numeric-owner", "-xpf", tarball], timeout=1800)
        return
    tree.debootstrap(target, spec.suite, wanted, mirror)
    if tarball is not None:
        tarball.parent.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial")
        run(["tar", "-C", target, "--numeric-owner", "-cpf", partial, "."], timeout=1800)
        partial.rename(tarball)


def build_image(spec: ImageSpec, out: Path, *, cache: Path | None = None) -> Path:
    """Write the image of `spec` to `out`; nothing is left at `out` when it fails."""
    mirror = spec.mirror or tree.host_mirror()
    work = Path(tempfile.mkdtemp(prefix=".cloudbuild-image-", dir=out.parent))
    try:
        root, esp = work / "root", work / "esp"
        root.mkdir()
        esp.mkdir()
        base_tree(root, spec, mirror, cache)
        tree.configure_base(root, suite=spec.suite, mirror=mirror, hostname=f"cloudbuild-{spec.kind}")
        content.configure_builder(root, spec.cloud)
        kernel, initrd = tree.kernel_files(root)
        disk.esp_tree(esp, kernel, initrd)
        disk.esp_image(esp, work / "esp.img")
        raw = out if spec.fmt == "raw" else work / "image.raw"
        disk.repart(raw, esp=work / "esp.img", root=root, definitions=work / "repart.d")
        if spec.fmt == "qcow2":
            disk.to_qcow2(raw, out)
        log.info("image written", out=str(out), kind=spec.kind, cloud=spec.cloud, bytes=out.stat().st_size)
        return out
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
