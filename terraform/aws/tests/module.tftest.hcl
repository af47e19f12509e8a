# Offline checks of the module's wiring: `terraform test` with a mocked AWS provider (plan only).

mock_provider "aws" {
  mock_data "aws_caller_identity" {
    defaults = { account_id = "123456789012" }
  }
  mock_data "aws_region" {
    defaults = { name = "eu-west-1" }
  }
  mock_data "aws_partition" {
    defaults = { partition = "aws" }
  }
  mock_data "aws_subnet" {
    defaults = { availability_zone = "eu-west-1a", vpc_id = "vpc-0123456789abcdef0" }
  }
  # the JSON is rendered by the real provider only; assertions read the statements themselves
  mock_data "aws_iam_policy_document" {
    defaults = { json = "{\"Version\":\"2012-10-17\",\"Statement\":[]}" }
  }
  mock_resource "aws_sqs_queue" {
    override_during = plan
    defaults = {
      arn = "arn:aws:sqs:eu-west-1:123456789012:fleet-jobs-dlq"
      url = "https://sqs.eu-west-1.amazonaws.com/123456789012/fleet-jobs"
    }
  }
  mock_resource "aws_security_group" {
    override_during = plan
    defaults = {
      id  = "sg-0123456789abcdef0"
      arn = "arn:aws:ec2:eu-west-1:123456789012:security-group/sg-0123456789abcdef0"
    }
  }
  mock_resource "aws_cloudwatch_log_group" {
    override_during = plan
    defaults        = { arn = "arn:aws:logs:eu-west-1:123456789012:log-group:/cloudbuild/fleet/worker" }
  }
  mock_resource "aws_s3_bucket" {
    override_during = plan
    defaults = {
      arn    = "arn:aws:s3:::fleet-results-0001"
      bucket = "fleet-results-0001"
      id     = "fleet-results-0001"
    }
  }
}

variables {
  name           = "fleet"
  worker_ami_id  = "ami-0123456789abcdef0"
  builder_ami_id = "ami-0fedcba9876543210"
  subnet_ids     = ["subnet-0123456789abcdef0"]
}

run "wiring" {
  command = plan

  assert {
    condition     = one(aws_autoscaling_group.workers.initial_lifecycle_hook).heartbeat_timeout > var.drain_timeout_seconds
    error_message = "the termination hook's heartbeat timeout must exceed the drain timeout"
  }
  assert {
    condition     = one(aws_autoscaling_group.workers.initial_lifecycle_hook).lifecycle_transition == "autoscaling:EC2_INSTANCE_TERMINATING"
    error_message = "the hook must hold terminating instances"
  }
  assert {
    condition     = aws_launch_template.worker.metadata_options[0].http_tokens == "required"
    error_message = "IMDSv2 must be required"
  }
  assert {
    condition     = aws_launch_template.worker.block_device_mappings[0].ebs[0].encrypted == "true"
    error_message = "the worker's root volume must be encrypted"
  }
  assert {
    condition     = jsondecode(aws_sqs_queue.jobs.redrive_policy).maxReceiveCount == 3
    error_message = "the redrive policy must use max_receive_count"
  }
  assert {
    condition     = aws_sqs_queue.jobs.sqs_managed_sse_enabled && aws_sqs_queue.dead_letter.sqs_managed_sse_enabled
    error_message = "both queues must be encrypted"
  }
  assert {
    condition     = aws_autoscaling_group.workers.protect_from_scale_in
    error_message = "new workers must start protected from scale-in"
  }
  assert {
    condition     = contains(aws_autoscaling_group.workers.suspended_processes, "AZRebalance")
    error_message = "AZRebalance must be suspended"
  }
  assert {
    condition     = aws_autoscaling_group.workers.min_size == 0
    error_message = "the fleet must be able to scale to zero"
  }
  assert {
    condition     = aws_autoscaling_policy.backlog.target_tracking_configuration[0].disable_scale_in
    error_message = "with an idle exit, scale-in is left to the workers"
  }
  assert {
    condition     = aws_s3_bucket_public_access_block.results.block_public_acls && aws_s3_bucket_public_access_block.results.restrict_public_buckets
    error_message = "the bucket must block public access"
  }
  assert {
    condition     = aws_s3_bucket_versioning.results.versioning_configuration[0].status == "Enabled"
    error_message = "the bucket must be versioned"
  }
  assert {
    condition     = [for c in one(data.aws_iam_policy_document.results_tls_only.statement).condition : c.variable] == ["aws:SecureTransport"]
    error_message = "the bucket policy must deny insecure transport"
  }
}

run "least_privilege" {
  command = plan

  # no wildcard action anywhere
  assert {
    condition     = alltrue([for s in data.aws_iam_policy_document.worker.statement : alltrue([for a in s.actions : !strcontains(a, "*")])])
    error_message = "the worker policy must name every action"
  }
  # "*" only for the Describe calls, which support no resource-level permissions
  assert {
    condition     = alltrue([for s in data.aws_iam_policy_document.worker.statement : s.sid == "Describe" || !contains(s.resources, "*")])
    error_message = "only Describe* may use the * resource"
  }
  assert {
    condition     = alltrue([for a in one([for s in data.aws_iam_policy_document.worker.statement : s.actions if s.sid == "Describe"]) : startswith(a, "ec2:Describe")])
    error_message = "the * resource statement must hold Describe calls only"
  }
  # every EC2 mutation is conditioned on cloudbuild's tags (or is the creation of a tagged builder's parts)
  assert {
    condition = alltrue([
      for s in data.aws_iam_policy_document.worker.statement :
      anytrue([for c in s.condition : strcontains(c.variable, "Tag/cloudbuild:") || c.variable == "ec2:CreateAction"])
      if anytrue([for a in s.actions : startswith(a, "ec2:") && !startswith(a, "ec2:Describe")]) && s.sid != "RunBuildersFromTheBuilderImageOnly"
    ])
    error_message = "every EC2 mutation must carry a tag condition"
  }
  assert {
    condition = alltrue([
      for c in one([for s in data.aws_iam_policy_document.worker.statement : s.condition if s.sid == "CreateTaggedVolumes"]) :
      c.variable == "aws:RequestTag/cloudbuild:owner" && c.test == "Null" && length(c.values) == 1 && contains(c.values, "false")
    ])
    error_message = "volumes may only be created carrying the cloudbuild:owner tag"
  }
  assert {
    condition = alltrue([
      for c in one([for s in data.aws_iam_policy_document.worker.statement : s.condition if s.sid == "ManageOwnVolumes"]) :
      c.variable == "ec2:ResourceTag/cloudbuild:owner"
    ])
    error_message = "volume mutations must be conditioned on the resource's cloudbuild:owner tag"
  }
  assert {
    condition     = contains(one([for s in data.aws_iam_policy_document.worker.statement : s.resources if s.sid == "RunBuildersFromTheBuilderImageOnly"]), "arn:aws:ec2:eu-west-1::image/ami-0fedcba9876543210")
    error_message = "builders may only run from the builder image"
  }
  # builders get no instance profile: the worker may not pass a role
  assert {
    condition     = !anytrue([for s in data.aws_iam_policy_document.worker.statement : contains(s.actions, "iam:PassRole")])
    error_message = "the worker must not hold iam:PassRole"
  }
  assert {
    condition     = one([for s in data.aws_iam_policy_document.worker.statement : s.resources if s.sid == "Jobs"]) == toset(["arn:aws:sqs:eu-west-1:123456789012:fleet-jobs"])
    error_message = "SQS access must be scoped to the job queue"
  }
  assert {
    condition     = one([for s in data.aws_iam_policy_document.worker.statement : s.resources if s.sid == "Results"]) == toset(["arn:aws:s3:::fleet-results-0001/cloudbuild/*"])
    error_message = "S3 access must be scoped to the results prefix"
  }
  assert {
    condition     = one([for s in data.aws_iam_policy_document.worker.statement : s.resources if s.sid == "Lifecycle"]) == toset(["arn:aws:autoscaling:eu-west-1:123456789012:autoScalingGroup:*:autoScalingGroupName/fleet-workers"])
    error_message = "Auto Scaling calls must be scoped to the fleet's group"
  }
}

run "keep_scale_in_without_idle_exit" {
  command = plan
  variables {
    idle_exit_seconds = 0
  }
  assert {
    condition     = !aws_autoscaling_policy.backlog.target_tracking_configuration[0].disable_scale_in
    error_message = "without an idle exit, target tracking scales in"
  }
}

run "heartbeat_must_exceed_drain" {
  command = plan
  variables {
    drain_timeout_seconds               = 1800
    lifecycle_heartbeat_timeout_seconds = 1800
  }
  expect_failures = [var.lifecycle_heartbeat_timeout_seconds]
}

run "bad_ami_refused" {
  command = plan
  variables {
    worker_ami_id = "ubuntu-latest"
  }
  expect_failures = [var.worker_ami_id]
}

run "spot_share_bounded" {
  command = plan
  variables {
    spot_percentage = 120
  }
  expect_failures = [var.spot_percentage]
}

run "max_not_below_min" {
  command = plan
  variables {
    min_size = 4
    max_size = 2
  }
  expect_failures = [var.max_size]
}

run "operator_options_not_for_jobs" {
  command = plan
  variables {
    allowed_job_options = ["vm-memory", "vm-type"]
  }
  expect_failures = [var.allowed_job_options]
}

run "redrive_count_bounded" {
  command = plan
  variables {
    max_receive_count = 0
  }
  expect_failures = [var.max_receive_count]
}

run "build_timeout_within_sqs_cap" {
  command = plan
  variables {
    build_timeout_seconds = 43200
  }
  expect_failures = [var.build_timeout_seconds]
}
