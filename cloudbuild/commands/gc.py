"""`cloudbuild gc --vm-type ec2|openstack [--dry-run] [--min-age SECONDS]`: sweep leaked cloud resources.

The rule (seen twice, `--min-age` apart) lives in `cloudbuild.cloud.common.sweep`; this command
only picks the cloud's adapter: the module `cloudbuild.cloud.<vm-type>.gc` provides
`gc_adapter() -> GcAdapter`. Exit 0 when the sweep did everything it decided to, 3 when an action
failed (the next sweep tries again).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Sequence

from cloudbuild import log as cblog
from cloudbuild.cloud.common import DEFAULT_MIN_AGE, GcAdapter, sweep
from cloudbuild.errors import ExitCode, UsageError
from cloudbuild.options import CLOUD_VM_TYPES


def _min_age(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds (0 or more)")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cloudbuild gc",
        description=(
            "Delete cloud resources tagged by cloudbuild whose worker is gone or whose lease expired. "
            "A resource is deleted only on a sweep at least --min-age seconds after the sweep that "
            "first saw it leaked (that one only marks it). Untagged resources are never touched."
        ),
    )
    p.add_argument("--vm-type", required=True, choices=CLOUD_VM_TYPES, help="the cloud to sweep")
    p.add_argument("--dry-run", action="store_true", help="log the decisions, change nothing")
    p.add_argument(
        "--min-age",
        type=_min_age,
        default=DEFAULT_MIN_AGE,
        metavar="SECONDS",
        help=f"seconds between the marking sweep and the deleting one (default {DEFAULT_MIN_AGE:g}, 0 allowed)",
    )
    p.add_argument("--log-format", choices=("auto", "console", "json"), default="auto")
    return p


def adapter_for(vm_type: str) -> GcAdapter:
    """The GC adapter of a cloud: `cloudbuild.cloud.<vm_type>.gc.gc_adapter()`."""
    if vm_type not in CLOUD_VM_TYPES:
        raise UsageError(
            f"gc: --vm-type {vm_type} has no cloud resources to sweep (choose {', '.join(CLOUD_VM_TYPES)})"
        )
    module = importlib.import_module(f"cloudbuild.cloud.{vm_type}.gc")
    factory: Callable[[], GcAdapter] | None = getattr(module, "gc_adapter", None)
    if factory is None:
        raise UsageError(f"gc: --vm-type {vm_type} does not support gc in this version")
    return factory()


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    cblog.configure(args.log_format)
    with cblog.bound(command="gc", vm_type=args.vm_type):
        report = sweep(adapter_for(args.vm_type), min_age=args.min_age, dry_run=args.dry_run)
    return int(ExitCode.OK if report.ok else ExitCode.INFRA)
