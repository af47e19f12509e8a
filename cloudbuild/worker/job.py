"""The job document: parsing, its JSON Schema, and the operator's policy on per-job options.

A job comes from a queue anyone with write access can fill, so it is untrusted input: size
capped before parsing, checked against the published schema (`job.schema.json`, also in docs),
and its options checked against what the operator allowed with `--allow NAME[=MAX]`. Every
refusal is a `JobRejected` whose message names the field or option and is stored as the job's
result (`cloudbuild status` shows it).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

from cloudbuild import options as cboptions
from cloudbuild.errors import UsageError

VERSION = 1
MAX_JOB_BYTES = 64 * 1024
DEFAULT_SCRIPT = "build.sh"

JOB_SETTABLE: dict[str, str] = {
    # option a job may set (when allowed) -> the VmOptions field its value lands in
    "vm-memory": "vm_memory",
    "jobs": "jobs",
    "vm-disk-size": "disk_size",
    "vm-swap-size": "swap_size",
    "build-timeout": "build_timeout",
}
"""Options that only size or time a build. Anything else (--vm-type, --vm-volumes, --root,
--ec2-*, paths on the worker) stays the operator's, whatever --allow says."""


class JobRejected(UsageError):
    """The job can never run on this worker: stored as its result, never retried."""


@cache
def schema() -> dict[str, Any]:
    text = resources.files("cloudbuild.worker").joinpath("job.schema.json").read_text(encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@dataclass(frozen=True)
class Job:
    id: str
    recipe: str
    script: str = DEFAULT_SCRIPT
    rootfs: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    timeout: float | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    attempt: int = 0

    @staticmethod
    def new_id() -> str:
        return "j-" + secrets.token_hex(8)

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": VERSION,
            "id": self.id,
            "recipe": self.recipe,
            "script": self.script,
        }
        if self.rootfs:
            doc["rootfs"] = self.rootfs
        if self.options:
            doc["options"] = dict(self.options)
        if self.timeout is not None:
            doc["timeout"] = self.timeout
        if self.labels:
            doc["labels"] = dict(self.labels)
        doc["attempt"] = self.attempt
        return doc

    def to_bytes(self) -> bytes:
        return json.dumps(self.document(), sort_keys=True).encode()


def _where(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    return f"field '{path}'" if path else "the document"


def parse(body: bytes) -> Job:
    """A Job from untrusted bytes, or JobRejected naming what is wrong."""
    if len(body) > MAX_JOB_BYTES:
        raise JobRejected(f"job document is {len(body)} bytes, over the limit of {MAX_JOB_BYTES}")
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JobRejected(f"job document is not valid JSON: {exc}") from None
    if isinstance(doc, dict) and "version" in doc and doc["version"] != VERSION:
        raise JobRejected(
            f"job format version {doc['version']!r} is unknown (this worker reads version {VERSION})"
        )
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        raise JobRejected(f"job {_where(first)}: {first.message}")
    options = {str(k): str(v) for k, v in doc.get("options", {}).items()}
    return Job(
        id=doc["id"],
        recipe=doc["recipe"],
        script=doc.get("script", DEFAULT_SCRIPT),
        rootfs=doc.get("rootfs"),
        options=options,
        timeout=float(doc["timeout"]) if "timeout" in doc else None,
        labels=dict(doc.get("labels", {})),
        attempt=int(doc.get("attempt", 0)),
    )


@dataclass(frozen=True)
class Allowance:
    """What the operator let jobs set: option name -> upper limit (None: any valid value)."""

    limits: Mapping[str, float | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, specs: Iterable[str]) -> Allowance:
        """From `--allow NAME[=MAX]` values; refuses options no job may set."""
        limits: dict[str, float | None] = {}
        for spec in specs:
            name, _, limit = spec.partition("=")
            name = name.lstrip("-")
            if name not in JOB_SETTABLE:
                raise UsageError(
                    f"--allow {spec}: jobs may never set '{name}' (allowable: {', '.join(JOB_SETTABLE)})"
                )
            if limit:
                limits[name] = _number(f"--allow {spec}", name, limit)
            else:
                limits[name] = None
        return cls(limits)

    def apply(self, job: Job, base: cboptions.VmOptions) -> cboptions.VmOptions:
        """The operator's options with the job's allowed ones on top; JobRejected for anything else."""
        return cboptions.parse(self.argv(job, base), defaults=base)

    def argv(self, job: Job, base: cboptions.VmOptions) -> list[str]:
        """The job's options as `cloudbuild build` arguments, checked; JobRejected for anything not allowed."""
        for name in job.options:
            if name not in self.limits:
                allowed = ", ".join(sorted(self.limits)) or "none"
                raise JobRejected(
                    f"job option '--{name}' is not allowed on this worker (allowed: {allowed}); "
                    "the operator sets it on the worker's command line"
                )
        argv: list[str] = []
        for name, value in job.options.items():
            limit = self.limits[name]
            if limit is not None and _number(f"job option '--{name}'", name, value) > limit:
                raise JobRejected(f"job option '--{name}' is {value}, over this worker's limit of {limit:g}")
            argv += [f"--{name}", value]
        timeout = job.timeout
        if timeout is not None:
            if base.build_timeout is not None and timeout > base.build_timeout:
                raise JobRejected(
                    f"job field 'timeout' is {timeout:g}s, over this worker's --build-timeout of {base.build_timeout:g}s"
                )
            argv += ["--build-timeout", f"{timeout:g}"]
        try:
            cboptions.parse(argv, defaults=base)
        except UsageError as exc:
            raise JobRejected(f"job option: {exc}") from None
        return argv


def _number(what: str, name: str, text: str) -> float:
    # sizes take cloudbuild's own spellings (2G): convert through the option parser itself
    try:
        parsed = cboptions.parse([f"--{name}", text])
    except UsageError as exc:
        raise JobRejected(f"{what}: {exc}") from None
    value = getattr(parsed, JOB_SETTABLE[name])
    return float(value)
