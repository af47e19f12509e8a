"""`cloudbuild image build|upload`: the builder and worker images of the clouds (docs/images.md).

    cloudbuild image build builder --cloud ec2|openstack --out FILE [--format raw|qcow2]
                           [--suite bookworm] [--mirror URL] [--cache DIR]
    cloudbuild image upload ec2 FILE [--name N]        prints the AMI id

The worker image and `upload openstack` are not built yet (docs/images.md).

Exit codes: 0 done, 1 bad options, 3 a tool, the mirror or the cloud failed (try again),
4 a tool is missing on this host.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from cloudbuild import log as cblog
from cloudbuild.commands.usage import UsageParser
from cloudbuild.errors import ExitCode, UsageError

KINDS = ("builder",)  # the worker image: not built yet


def parser() -> argparse.ArgumentParser:
    p = UsageParser(prog="cloudbuild image", description="Build and upload the cloud images.")
    p.add_argument("--log-format", choices=("auto", "console", "json"), default="auto")
    sub = p.add_subparsers(dest="action", required=True, metavar="build|upload", parser_class=UsageParser)
    b = sub.add_parser("build", help="build a builder image file")
    b.add_argument("kind", choices=KINDS)
    b.add_argument("--cloud", required=True, choices=("ec2", "openstack"))
    b.add_argument("--out", required=True, type=Path, metavar="FILE", help="the image file to write")
    b.add_argument("--format", dest="fmt", choices=("raw", "qcow2"), default="raw")
    b.add_argument("--suite", default="bookworm", help="Debian suite (default bookworm)")
    b.add_argument("--mirror", default="", help="Debian mirror (default: the one in this host's apt sources)")
    b.add_argument("--cache", type=Path, help="keep/reuse the debootstrap result here (a tarball)")
    u = sub.add_parser("upload", help="upload an image file to a cloud")
    u.add_argument("cloud", choices=("ec2",))
    u.add_argument("file", type=Path, metavar="FILE")
    u.add_argument("--name", default="", help="image name (default: cloudbuild-<file name>)")
    u.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    cblog.configure(args.log_format)
    if args.action == "build":
        from cloudbuild.images.build import ImageSpec, build_image

        out: Path = args.out
        if not out.parent.is_dir():
            raise UsageError(f"--out {out}: folder {out.parent} does not exist (create it first)")
        spec = ImageSpec(args.kind, args.cloud, suite=args.suite, mirror=args.mirror, fmt=args.fmt)
        with cblog.bound(command="image build", kind=args.kind, cloud=args.cloud):
            build_image(spec, out.resolve(), cache=args.cache)
        print(out)
        return int(ExitCode.OK)
    file: Path = args.file
    if not file.is_file():
        raise UsageError(f"upload: FILE {file} is not a file (give the image that `image build` wrote)")
    name = args.name or f"cloudbuild-{file.stem}"
    with cblog.bound(command="image upload", cloud=args.cloud, name=name):
        from cloudbuild.images.upload_ec2 import upload

        print(upload(file, name=name, progress=not args.no_progress))
    return int(ExitCode.OK)
