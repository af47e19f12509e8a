# The worker's permissions: exactly what cloudbuild calls, nothing more.
# - EC2 mutations only on resources that carry cloudbuild's tags (aws:RequestTag at create,
#   ec2:ResourceTag after); the workers themselves carry cloudbuild:fleet (propagated by the group).
# - Builders get no instance profile: the worker has no iam:PassRole, so RunInstances with one fails.
# - Describe* calls support no resource-level permissions, so they alone use "*".

locals {
  ec2_arn          = "arn:${local.partition}:ec2:${local.region}:${local.account}"
  volume_arns      = "${local.ec2_arn}:volume/*"
  instance_arns    = "${local.ec2_arn}:instance/*"
  group_arn        = "arn:${local.partition}:autoscaling:${local.region}:${local.account}:autoScalingGroup:*:autoScalingGroupName/${var.name}-workers"
  results_objects  = "${aws_s3_bucket.results.arn}/${var.results_prefix}/*"
  cloudbuild_owner = "cloudbuild:owner"
}

data "aws_iam_policy_document" "assume_by_ec2" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

data "aws_iam_policy_document" "worker" {
  statement {
    sid = "Describe"
    actions = [
      "ec2:DescribeImages",
      "ec2:DescribeInstances",
      "ec2:DescribeSnapshots",
      "ec2:DescribeSubnets",
      "ec2:DescribeVolumes",
    ]
    resources = ["*"]
  }

  statement {
    sid       = "CreateTaggedVolumes"
    actions   = ["ec2:CreateVolume"]
    resources = [local.volume_arns]
    condition {
      test     = "Null"
      variable = "aws:RequestTag/${local.cloudbuild_owner}"
      values   = ["false"]
    }
  }

  statement {
    sid       = "RunTaggedBuilders"
    actions   = ["ec2:RunInstances"]
    resources = [local.instance_arns]
    condition {
      test     = "Null"
      variable = "aws:RequestTag/${local.cloudbuild_owner}"
      values   = ["false"]
    }
  }

  statement {
    sid     = "RunBuildersFromTheBuilderImageOnly"
    actions = ["ec2:RunInstances"]
    resources = [
      "arn:${local.partition}:ec2:${local.region}::image/${var.builder_ami_id}",
      "${local.ec2_arn}:subnet/${var.subnet_ids[0]}",
      aws_security_group.builder.arn,
      "${local.ec2_arn}:network-interface/*",
      # the builder's own root volume, made from the image
      local.volume_arns,
    ]
  }

  statement {
    sid       = "TagOnCreate"
    actions   = ["ec2:CreateTags"]
    resources = [local.volume_arns, local.instance_arns]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["CreateVolume", "RunInstances"]
    }
  }

  statement {
    sid     = "RetagOwnResources"
    actions = ["ec2:CreateTags", "ec2:DeleteTags"]
    resources = [
      local.volume_arns,
      local.instance_arns,
      "arn:${local.partition}:ec2:${local.region}::snapshot/*",
      "arn:${local.partition}:ec2:${local.region}::image/*",
    ]
    condition {
      test     = "Null"
      variable = "ec2:ResourceTag/${local.cloudbuild_owner}"
      values   = ["false"]
    }
    # only cloudbuild's own bookkeeping tags (pool, lease, gc-seen) may change
    condition {
      test     = "ForAllValues:StringLike"
      variable = "aws:TagKeys"
      values   = ["cloudbuild:*"]
    }
  }

  statement {
    sid       = "ManageOwnVolumes"
    actions   = ["ec2:AttachVolume", "ec2:DetachVolume", "ec2:DeleteVolume"]
    resources = [local.volume_arns]
    condition {
      test     = "Null"
      variable = "ec2:ResourceTag/${local.cloudbuild_owner}"
      values   = ["false"]
    }
  }

  statement {
    sid       = "AttachToBuilders"
    actions   = ["ec2:AttachVolume", "ec2:DetachVolume"]
    resources = [local.instance_arns]
    condition {
      test     = "Null"
      variable = "ec2:ResourceTag/${local.cloudbuild_owner}"
      values   = ["false"]
    }
  }

  statement {
    sid       = "AttachToWorkersOfThisFleet"
    actions   = ["ec2:AttachVolume", "ec2:DetachVolume"]
    resources = [local.instance_arns]
    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/cloudbuild:fleet"
      values   = [var.name]
    }
  }

  statement {
    sid = "RunOwnBuilders"
    actions = [
      "ec2:GetConsoleOutput",
      "ec2:ModifyInstanceAttribute",
      "ec2:StartInstances",
      "ec2:StopInstances",
      "ec2:TerminateInstances",
    ]
    resources = [local.instance_arns]
    condition {
      test     = "Null"
      variable = "ec2:ResourceTag/${local.cloudbuild_owner}"
      values   = ["false"]
    }
  }

  statement {
    sid       = "SweepOwnImagesAndSnapshots"
    actions   = ["ec2:DeleteSnapshot", "ec2:DeregisterImage"]
    resources = ["arn:${local.partition}:ec2:${local.region}::snapshot/*", "arn:${local.partition}:ec2:${local.region}::image/*"]
    condition {
      test     = "Null"
      variable = "ec2:ResourceTag/${local.cloudbuild_owner}"
      values   = ["false"]
    }
  }

  statement {
    sid = "Jobs"
    actions = [
      "sqs:ChangeMessageVisibility",
      "sqs:DeleteMessage",
      "sqs:GetQueueAttributes",
      "sqs:GetQueueUrl",
      "sqs:ReceiveMessage",
    ]
    # the ARN built from the name, not read from the queue, so the policy is known at plan time
    # and does not change whenever the queue's attributes do
    resources = ["arn:${local.partition}:sqs:${local.region}:${local.account}:${var.name}-jobs"]
  }

  statement {
    sid = "Results"
    actions = [
      "s3:AbortMultipartUpload",
      "s3:GetObject",
      "s3:PutObject",
    ]
    resources = [local.results_objects]
  }

  statement {
    sid = "Lifecycle"
    actions = [
      "autoscaling:CompleteLifecycleAction",
      "autoscaling:RecordLifecycleActionHeartbeat",
      "autoscaling:SetInstanceHealth",
      "autoscaling:SetInstanceProtection",
      "autoscaling:TerminateInstanceInAutoScalingGroup",
    ]
    resources = [local.group_arn]
  }

  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.worker.arn}:*"]
  }
}

resource "aws_iam_role" "worker" {
  name_prefix        = "${var.name}-worker-"
  assume_role_policy = data.aws_iam_policy_document.assume_by_ec2.json
  tags               = local.tags
}

resource "aws_iam_role_policy" "worker" {
  name   = "cloudbuild-worker"
  role   = aws_iam_role.worker.id
  policy = data.aws_iam_policy_document.worker.json
}

resource "aws_iam_instance_profile" "worker" {
  name_prefix = "${var.name}-worker-"
  role        = aws_iam_role.worker.name
  tags        = local.tags
}
