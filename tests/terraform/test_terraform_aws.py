"""terraform/aws: formatted, valid, its own `terraform test`, and a real apply against moto's server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.terraform.conftest import TERRAFORM, Terraform, copy_config, reset_moto

MODULE = TERRAFORM / "aws"
EXAMPLES = sorted(p for p in (MODULE / "examples").iterdir() if p.is_dir())
REGION = "eu-west-1"
AMIS = ["-var", "worker_ami_id=ami-0123456789abcdef0", "-var", "builder_ami_id=ami-0fedcba9876543210"]

# What moto reports differently from what it was given, so a second plan shows a change although
# nothing changed in AWS. Each entry: resource address -> the attributes that drift, and why.
MOTO_DRIFTS: dict[str, dict[str, str]] = {
    "module.fleet.aws_autoscaling_group.workers": {
        "mixed_instances_policy": "moto's DescribeAutoScalingGroups omits MixedInstancesPolicy",
    },
    "module.fleet.aws_autoscaling_policy.backlog": {
        "enabled": "moto's DescribePolicies omits Enabled (the provider reads false)",
        "predictive_scaling_configuration": "moto returns an empty predictive configuration",
    },
    "module.fleet.aws_autoscaling_policy.from_zero": {
        "enabled": "moto's DescribePolicies omits Enabled (the provider reads false)",
        "predictive_scaling_configuration": "moto returns an empty predictive configuration",
    },
    "module.fleet.aws_launch_template.worker": {
        "tag_specifications": "moto reports the template's own tags as a launch-template tag specification",
        "latest_version": "follows from the tag_specifications drift (an update makes a new version)",
    },
    "module.fleet.aws_sqs_queue.jobs": {
        "redrive_policy": "moto returns the redrive policy JSON with other whitespace (same document)",
    },
}


def test_fmt_check(tf: Terraform) -> None:
    result = tf.run("fmt", "-check", "-recursive", "-diff", str(TERRAFORM), cwd=TERRAFORM, check=False)
    assert result.returncode == 0, f"terraform fmt would change:\n{result.stdout}"


@pytest.mark.parametrize("config", [MODULE, *EXAMPLES], ids=lambda p: str(p.relative_to(TERRAFORM)))
def test_validate(tf: Terraform, tmp_path: Path, config: Path) -> None:
    work = copy_config(MODULE, tmp_path / "aws") / config.relative_to(MODULE)
    tf.run("init", "-backend=false", "-input=false", cwd=work)
    result = tf.json("validate", cwd=work)
    assert result["valid"], result["diagnostics"]
    assert result["warning_count"] == 0, result["diagnostics"]


def test_module_tests_pass(tf: Terraform, tmp_path: Path) -> None:
    """The module's own .tftest.hcl: wiring, least privilege and refused variable values."""
    work = copy_config(MODULE, tmp_path / "aws")
    tf.run("init", "-backend=false", "-input=false", cwd=work)
    result = tf.run("test", cwd=work, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout and "Success!" in result.stdout, result.stdout


def moto_override(endpoint: str) -> str:
    """Test-only provider settings (an *_override.tf file), never part of the module or example."""
    services = ["autoscaling", "cloudwatch", "ec2", "iam", "logs", "s3", "sqs", "sts"]
    lines = "\n".join(f'    {name} = "{endpoint}"' for name in services)
    return (
        'provider "aws" {\n'
        '  access_key                  = "testing"\n'
        '  secret_key                  = "testing"\n'
        "  skip_credentials_validation = true\n"
        "  skip_metadata_api_check     = true\n"
        "  s3_use_path_style           = true\n"
        f"  endpoints {{\n{lines}\n  }}\n}}\n"
    )


def normal(value: Any) -> Any:
    """A value with null, "", [] and {} made one (plan's text shows no change between them)."""
    if isinstance(value, dict):
        value = {k: normal(v) for k, v in value.items() if normal(v) is not None}
    elif isinstance(value, list):
        value = [normal(v) for v in value if normal(v) is not None]
    return value if value not in ("", [], {}) else None


def changed_attributes(change: dict[str, Any]) -> set[str]:
    """Attributes whose value changes, by `normal` value, or that become unknown."""
    before, after = change["before"] or {}, change["after"] or {}
    unknown = change.get("after_unknown") or {}
    keys = set(before) | set(after)
    return {k for k in keys if normal(before.get(k)) != normal(after.get(k)) or unknown.get(k) is True}


def unexpected_drift(plan: dict[str, Any]) -> list[str]:
    problems = []
    for resource in plan.get("resource_changes", []):
        actions = resource["change"]["actions"]
        if actions == ["no-op"] or resource["mode"] == "data":
            continue
        address = resource["address"]
        if actions != ["update"]:
            problems.append(f"{address}: {actions}")
            continue
        extra = changed_attributes(resource["change"]) - set(MOTO_DRIFTS.get(address, {}))
        change = resource["change"]
        problems += [
            f"{address}.{k}: {change['before'].get(k)!r} -> {change['after'].get(k)!r}" for k in sorted(extra)
        ]
    return problems


def fleet_resources(endpoint: str) -> dict[str, list[str]]:
    """Whatever the example could have left in moto, by kind."""
    kw: dict[str, Any] = {"endpoint_url": endpoint, "region_name": REGION}
    sqs, s3, asg = boto3.client("sqs", **kw), boto3.client("s3", **kw), boto3.client("autoscaling", **kw)
    ec2, iam, logs = boto3.client("ec2", **kw), boto3.client("iam", **kw), boto3.client("logs", **kw)
    return {
        "queues": sqs.list_queues().get("QueueUrls", []),
        "buckets": [b["Name"] for b in s3.list_buckets()["Buckets"]],
        "groups": [
            g["AutoScalingGroupName"] for g in asg.describe_auto_scaling_groups()["AutoScalingGroups"]
        ],
        "templates": [t["LaunchTemplateName"] for t in ec2.describe_launch_templates()["LaunchTemplates"]],
        "roles": [r["RoleName"] for r in iam.list_roles()["Roles"] if r["RoleName"].startswith("cbexample")],
        "profiles": [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]],
        "log_groups": [g["logGroupName"] for g in logs.describe_log_groups()["logGroups"]],
        "vpcs": [v["VpcId"] for v in ec2.describe_vpcs()["Vpcs"] if not v.get("IsDefault")],
        "instances": [
            i["InstanceId"]
            for r in ec2.describe_instances()["Reservations"]
            for i in r["Instances"]
            if i["State"]["Name"] != "terminated"
        ],
    }


@pytest.mark.slow
def test_example_applies_against_moto_and_destroys_clean(
    tf: Terraform, moto_http: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reset_moto(moto_http)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)
    work = copy_config(MODULE, tmp_path / "aws") / "examples" / "fleet"
    (work / "moto_override.tf").write_text(moto_override(moto_http))
    tf.run("init", "-input=false", cwd=work)
    try:
        tf.run("apply", "-auto-approve", "-input=false", *AMIS, cwd=work)
        outputs = tf.json("output", cwd=work)
        queue_url, bucket = outputs["queue_url"]["value"], outputs["bucket"]["value"]
        assert outputs["submit_command"]["value"].startswith(f"cloudbuild submit --queue sqs://{queue_url} ")

        # what the module promised, read back from the (fake) AWS APIs
        kw: dict[str, Any] = {"endpoint_url": moto_http, "region_name": REGION}
        attributes = boto3.client("sqs", **kw).get_queue_attributes(
            QueueUrl=queue_url, AttributeNames=["All"]
        )["Attributes"]
        assert json.loads(attributes["RedrivePolicy"])["maxReceiveCount"] == 3
        assert (
            attributes["VisibilityTimeout"] == "300" and attributes["ReceiveMessageWaitTimeSeconds"] == "20"
        )
        s3 = boto3.client("s3", **kw)
        assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
        assert all(s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"].values())
        group = boto3.client("autoscaling", **kw).describe_auto_scaling_groups(
            AutoScalingGroupNames=[outputs["group_name"]["value"]]
        )["AutoScalingGroups"][0]
        assert group["NewInstancesProtectedFromScaleIn"] and group["MinSize"] == 0
        assert [p["ProcessName"] for p in group["SuspendedProcesses"]] == ["AZRebalance"]

        plan_file = work / "second.plan"
        second = tf.run(
            "plan", "-detailed-exitcode", "-input=false", "-out", str(plan_file), *AMIS, cwd=work, check=False
        )
        assert second.returncode in (0, 2), second.stderr
        problems = unexpected_drift(tf.json("show", str(plan_file), cwd=work))
        assert not problems, "a second plan changes more than moto's known drifts:\n" + "\n".join(problems)
    finally:
        tf.run("destroy", "-auto-approve", "-input=false", *AMIS, cwd=work)
    left = {kind: names for kind, names in fleet_resources(moto_http).items() if names}
    assert not left, f"destroy left {left}"


@pytest.mark.slow
def test_subnets_in_two_zones_are_refused_at_plan(
    tf: Terraform, moto_http: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reset_moto(moto_http)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)
    ec2 = boto3.client("ec2", endpoint_url=moto_http, region_name=REGION)
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnets = [
        ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{i}.0/24", AvailabilityZone=f"{REGION}{zone}")[
            "Subnet"
        ]["SubnetId"]
        for i, zone in enumerate("ab")
    ]
    work = tmp_path / "two-zones"
    work.mkdir()
    (work / "main.tf").write_text(
        f'provider "aws" {{\n  region = "{REGION}"\n}}\n'
        f'module "fleet" {{\n  source         = "{MODULE}"\n  name           = "twozones"\n'
        '  worker_ami_id  = "ami-0123456789abcdef0"\n  builder_ami_id = "ami-0fedcba9876543210"\n'
        f"  subnet_ids     = {json.dumps(subnets)}\n}}\n"
    )
    (work / "moto_override.tf").write_text(moto_override(moto_http))
    tf.run("init", "-input=false", cwd=work)
    result = tf.run("plan", "-input=false", cwd=work, check=False)
    assert result.returncode == 1
    message = " ".join(result.stderr.split())
    assert "subnet_ids: all subnets must be in one availability zone" in message, result.stderr
    assert f"{REGION}a, {REGION}b" in message
