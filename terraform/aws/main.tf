# A cloudbuild worker fleet in one availability zone: an Auto Scaling group of workers that take
# jobs from SQS, launch builders on EBS volumes, and store results in S3.

data "aws_caller_identity" "current" {}
data "aws_region" "current" {}
data "aws_partition" "current" {}

data "aws_subnet" "fleet" {
  # count, not for_each: the ids are often unknown until the subnets are created
  count = length(var.subnet_ids)
  id    = var.subnet_ids[count.index]
}

locals {
  account   = data.aws_caller_identity.current.account_id
  region    = data.aws_region.current.name
  partition = data.aws_partition.current.partition
  zones     = distinct([for s in data.aws_subnet.fleet : s.availability_zone])
  vpc_id    = data.aws_subnet.fleet[0].vpc_id

  tags = merge(var.tags, { "cloudbuild:fleet" = var.name })

  queue_url = aws_sqs_queue.jobs.url
  store_url = "s3://${aws_s3_bucket.results.bucket}/${var.results_prefix}"

  # the worker's command line: the operator's backend and limits; jobs may only set `--allow`ed options
  worker_args = concat(
    [
      "--queue", "sqs://${local.queue_url}",
      "--store", local.store_url,
      "--slots", tostring(var.slots),
      "--lease", tostring(var.lease_seconds),
      "--drain-timeout", tostring(var.drain_timeout_seconds),
      "--idle-exit", tostring(var.idle_exit_seconds),
      "--build-timeout", tostring(var.build_timeout_seconds),
      "--vm-type", "ec2",
      "--ec2-builder-ami", var.builder_ami_id,
      "--ec2-instance-type", var.builder_instance_type,
      "--ec2-subnet", var.subnet_ids[0],
      "--ec2-security-group", aws_security_group.builder.id,
      "--ec2-pool", tostring(var.builder_pool_size),
    ],
    flatten([for o in var.allowed_job_options : ["--allow", o]]),
  )
}

# ---- the job queue and its dead-letter queue -------------------------------------------------

resource "aws_sqs_queue" "dead_letter" {
  name                      = "${var.name}-jobs-dlq"
  message_retention_seconds = 1209600 # 14 days, SQS's longest: poison jobs wait for a human
  sqs_managed_sse_enabled   = true
  tags                      = local.tags
}

resource "aws_sqs_queue" "jobs" {
  name                       = "${var.name}-jobs"
  visibility_timeout_seconds = var.lease_seconds
  receive_wait_time_seconds  = 20 # long polling, as the worker does
  message_retention_seconds  = 1209600
  sqs_managed_sse_enabled    = true
  # the dead-letter queue is the queue's redrive policy: the worker never deletes a poison job itself
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dead_letter.arn
    maxReceiveCount     = var.max_receive_count
  })
  tags = local.tags
}

# ---- the results bucket ---------------------------------------------------------------------

resource "aws_s3_bucket" "results" {
  #checkov:skip=CKV_AWS_18:access logging needs a second (log) bucket the operator already has; set it there
  #checkov:skip=CKV_AWS_144:results are reproducible build outputs; cross-region replication is the operator's choice
  #checkov:skip=CKV2_AWS_62:nothing consumes bucket events; the worker publishes status.json itself
  #checkov:skip=CKV_AWS_145:SSE-S3 is on; a customer managed key is the operator's choice (bucket key policy)
  bucket_prefix = "${var.name}-results-"
  force_destroy = var.force_destroy_bucket
  tags          = local.tags
}

resource "aws_s3_bucket_ownership_controls" "results" {
  bucket = aws_s3_bucket.results.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "results" {
  bucket                  = aws_s3_bucket.results.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "results" {
  bucket = aws_s3_bucket.results.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_versioning" "results" {
  bucket = aws_s3_bucket.results.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "results" {
  bucket     = aws_s3_bucket.results.id
  depends_on = [aws_s3_bucket_versioning.results]

  rule {
    id     = "expire-results"
    status = "Enabled"
    filter {
      prefix = "${var.results_prefix}/"
    }
    expiration {
      days = var.results_expiry_days
    }
    noncurrent_version_expiration {
      noncurrent_days = var.results_expiry_days
    }
  }

  # a worker that died mid-upload leaves multipart parts nobody completes, under any prefix
  rule {
    id     = "abort-incomplete-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

data "aws_iam_policy_document" "results_tls_only" {
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.results.arn,
      "${aws_s3_bucket.results.arn}/*",
    ]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "results" {
  bucket     = aws_s3_bucket.results.id
  policy     = data.aws_iam_policy_document.results_tls_only.json
  depends_on = [aws_s3_bucket_public_access_block.results]
}

# ---- logs -----------------------------------------------------------------------------------

resource "aws_cloudwatch_log_group" "worker" {
  #checkov:skip=CKV_AWS_158:the logs hold build events, no secrets; CloudWatch encrypts at rest without a customer key
  #checkov:skip=CKV_AWS_338:retention is a variable (log_retention_days); a year of build logs is the operator's choice
  name              = "/cloudbuild/${var.name}/worker"
  retention_in_days = var.log_retention_days
  tags              = local.tags
}

# ---- network: builders talk to nobody; workers only call AWS APIs ---------------------------

resource "aws_security_group" "builder" {
  name        = "${var.name}-builder"
  description = "cloudbuild builders: no ingress, no egress (the build runs offline on its volumes)"
  vpc_id      = local.vpc_id
  tags        = local.tags
  # no ingress and no egress blocks: Terraform removes AWS's default allow-all egress rule
  egress = []
}

resource "aws_security_group" "worker" {
  name        = "${var.name}-worker"
  description = "cloudbuild workers: no ingress; HTTPS out to the AWS APIs"
  vpc_id      = local.vpc_id
  tags        = local.tags

  egress {
    description = "HTTPS to the AWS APIs (EC2, SQS, S3, Auto Scaling, CloudWatch Logs)"
    from_port   = 443
    to_port     = 443
    protocol    = "tcp"
    cidr_blocks = ["0.0.0.0/0"] #checkov:skip=CKV_AWS_382:the AWS API endpoints have no fixed addresses without VPC endpoints
  }
}
