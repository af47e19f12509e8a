"""terraform/openstack: no provider is available offline, so the HCL is parsed and its wiring checked,
and the workers' cloud-init is rendered by Terraform itself and checked by `cloud-init schema`."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml

from cloudbuild import runner
from tests.terraform.conftest import TERRAFORM, Terraform

MODULE = TERRAFORM / "openstack"
EXAMPLE = MODULE / "examples" / "fleet"


def unquote(value: Any) -> Any:
    """python-hcl2 keeps HCL's quotes around strings and block labels."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    if isinstance(value, dict):
        return {unquote(k): unquote(v) for k, v in value.items() if k != "__comments__"}
    if isinstance(value, list):
        return [unquote(v) for v in value]
    return value


def parse(folder: Path) -> dict[str, list[Any]]:
    merged: dict[str, list[Any]] = {}
    for path in sorted(folder.glob("*.tf")):
        with path.open() as handle:
            for key, blocks in unquote(hcl2.load(handle)).items():
                merged.setdefault(key, []).extend(blocks)
    return merged


def blocks(config: dict[str, list[Any]], kind: str) -> dict[str, Any]:
    """{'type.name': body} for resources, {'name': body} for variables, modules, outputs."""
    found: dict[str, Any] = {}
    for entry in config.get(kind, []):
        for label, body in entry.items():
            if kind == "resource":
                for name, inner in body.items():
                    found[f"{label}.{name}"] = inner
            else:
                found[label] = body
    return found


def references(folder: Path, *, skip: str = "variables.tf") -> set[str]:
    text = "".join(p.read_text() for p in folder.glob("*.tf") if p.name != skip)
    text += (
        "".join(p.read_text() for p in (folder / "templates").glob("*") if p.is_file())
        if (folder / "templates").is_dir()
        else ""
    )
    return set(re.findall(r"\bvar\.([a-z0-9_]+)", text))


def test_every_variable_is_declared_and_used() -> None:
    for folder in (MODULE, EXAMPLE):
        declared = set(blocks(parse(folder), "variable"))
        used = references(folder)
        assert used - declared == set(), f"{folder}: used but not declared: {used - declared}"
        assert declared - used == set(), f"{folder}: declared but never used: {declared - used}"
        for name, body in blocks(parse(folder), "variable").items():
            assert body.get("description"), f"{folder}: variable {name} has no description"


def test_example_passes_every_required_variable_and_no_unknown_one() -> None:
    variables = blocks(parse(MODULE), "variable")
    call = blocks(parse(EXAMPLE), "module")["fleet"]
    arguments = set(call) - {"source", "__is_block__"}
    required = {name for name, body in variables.items() if "default" not in body}
    assert arguments <= set(variables), f"unknown arguments: {arguments - set(variables)}"
    assert required <= arguments, f"required variables not given: {required - arguments}"


def test_wiring() -> None:
    resources = blocks(parse(MODULE), "resource")
    assert resources["openstack_compute_servergroup_v2.workers"]["policies"] == ["soft-anti-affinity"]
    workers = resources["openstack_compute_instance_v2.workers"]
    assert workers["scheduler_hints"][0]["group"] == "${openstack_compute_servergroup_v2.workers.id}"
    assert "templates/cloud-init.yaml.tftpl" in workers["user_data"]
    # builders: a group with AWS-style default rules removed and no rule of its own
    assert resources["openstack_networking_secgroup_v2.builder"]["delete_default_rules"] is True
    rules = [
        body for name, body in resources.items() if name.startswith("openstack_networking_secgroup_rule_v2.")
    ]
    assert rules and not any("secgroup_v2.builder" in body["security_group_id"] for body in rules)
    # workers: egress only
    worker_rules = [b for b in rules if "secgroup_v2.worker.id" in b["security_group_id"]]
    assert worker_rules and all(b["direction"] == "egress" for b in worker_rules)
    assert resources["openstack_networking_secgroup_v2.worker"]["delete_default_rules"] is True
    assert "openstack_objectstorage_container_v1.results" in resources
    # the key pair and the Redis server are optional
    assert resources["openstack_compute_keypair_v2.workers"]["count"].startswith(
        "${var.key_pair_public_key == null"
    )
    assert resources["openstack_compute_instance_v2.redis"]["count"] == "${var.create_redis ? 1 : 0}"


WORKER_ARGS = [
    "--queue",
    "redis://10.0.0.5:6379/cloudbuild-jobs",
    "--store",
    "swift://fleet-results/cloudbuild",
    "--slots",
    "2",
]


def render_cloud_init(tf: Terraform, tmp_path: Path) -> str:
    """The template rendered by Terraform's own templatefile(), as the module renders it."""
    variables = {
        "auth_url": "https://keystone.example.org:5000/v3",
        "region": "RegionOne",
        "credential_id": "0123abcd",
        "credential_secret": "s3cr3t: with colon",
        "worker_args": WORKER_ARGS,
    }
    expression = (
        f'jsonencode(templatefile("{MODULE}/templates/cloud-init.yaml.tftpl", {json.dumps(variables)}))'
    )
    work = tmp_path / "console"
    work.mkdir()
    out = runner.run([tf.binary, "console"], input=expression + "\n", cwd=work, env=tf.env).stdout
    # console prints the JSON string as an HCL string literal: decode both layers
    return str(json.loads(json.loads(out)))


def test_cloud_init_renders_and_passes_cloud_init_schema(tf: Terraform, tmp_path: Path) -> None:
    rendered = render_cloud_init(tf, tmp_path)
    document = yaml.safe_load(rendered)
    files = {entry["path"]: entry for entry in document["write_files"]}
    clouds = yaml.safe_load(files["/etc/openstack/clouds.yaml"]["content"])
    auth = clouds["clouds"]["cloudbuild"]["auth"]
    assert auth["application_credential_secret"] == "s3cr3t: with colon"
    assert files["/etc/openstack/clouds.yaml"]["permissions"] == "0600"
    assert files["/etc/cloudbuild/worker.args"]["content"].split("\n")[:-1] == WORKER_ARGS
    assert ["systemctl", "enable", "--now", "cloudbuild-worker.service"] in document["runcmd"]
    config = tmp_path / "user-data.yaml"
    config.write_text(rendered)
    result = runner.run(["cloud-init", "schema", "--config-file", config], check=False)
    assert result.returncode == 0 and "Valid cloud-config" in result.stdout, result.stdout + result.stderr


def test_cloud_init_schema_refuses_a_broken_document(tmp_path: Path) -> None:
    """The schema check can fail: a write_files entry without a path is refused."""
    config = tmp_path / "broken.yaml"
    config.write_text("#cloud-config\nwrite_files:\n  - content: x\n    permissions: 644\n")
    result = runner.run(["cloud-init", "schema", "--config-file", config], check=False)
    assert result.returncode != 0


@pytest.mark.parametrize(
    "template", sorted((TERRAFORM / "aws" / "templates").glob("*.tftpl")), ids=lambda p: p.name
)
def test_aws_user_data_passes_cloud_init_schema(tf: Terraform, tmp_path: Path, template: Path) -> None:
    variables = {"worker_args": WORKER_ARGS, "region": "eu-west-1", "log_group": "/cloudbuild/fleet/worker"}
    expression = f'jsonencode(templatefile("{template}", {json.dumps(variables)}))'
    work = tmp_path / "console"
    work.mkdir()
    out = runner.run([tf.binary, "console"], input=expression + "\n", cwd=work, env=tf.env).stdout
    config = tmp_path / "user-data.yaml"
    config.write_text(json.loads(json.loads(out)))
    document = yaml.safe_load(config.read_text())
    assert document["write_files"][0]["content"].split("\n")[:-1] == WORKER_ARGS
    result = runner.run(["cloud-init", "schema", "--config-file", config], check=False)
    assert result.returncode == 0 and "Valid cloud-config" in result.stdout, result.stdout + result.stderr
