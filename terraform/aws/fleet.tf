# The workers: a launch template and an Auto Scaling group in one zone, a termination lifecycle
# hook the worker drains on, and scaling on the backlog per worker.

resource "aws_launch_template" "worker" {
  name_prefix   = "${var.name}-worker-"
  image_id      = var.worker_ami_id
  instance_type = var.worker_instance_types[0]
  user_data = base64encode(templatefile("${path.module}/templates/user-data.yaml.tftpl", {
    worker_args = local.worker_args
    region      = local.region
    log_group   = aws_cloudwatch_log_group.worker.name
  }))

  iam_instance_profile {
    arn = aws_iam_instance_profile.worker.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required" # IMDSv2 only
    http_put_response_hop_limit = var.imds_hop_limit
    instance_metadata_tags      = "disabled"
  }

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size           = var.worker_root_volume_gb
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  vpc_security_group_ids = [aws_security_group.worker.id]

  tag_specifications {
    resource_type = "volume"
    tags          = local.tags
  }

  tags = local.tags
}

resource "aws_autoscaling_group" "workers" {
  name                = "${var.name}-workers"
  min_size            = var.min_size
  max_size            = var.max_size
  vpc_zone_identifier = var.subnet_ids
  # new workers start protected; the worker itself turns protection off while idle, so scale-in
  # always picks an idle worker
  protect_from_scale_in = true
  # rebalancing across zones would terminate busy workers; this group has one zone anyway
  suspended_processes       = ["AZRebalance"]
  capacity_rebalance        = var.spot_percentage > 0
  health_check_type         = "EC2"
  wait_for_capacity_timeout = "0"
  enabled_metrics           = ["GroupInServiceInstances", "GroupDesiredCapacity", "GroupPendingInstances"]

  mixed_instances_policy {
    instances_distribution {
      on_demand_base_capacity                  = var.on_demand_base_capacity
      on_demand_percentage_above_base_capacity = 100 - var.spot_percentage
      spot_allocation_strategy                 = "price-capacity-optimized"
    }
    launch_template {
      launch_template_specification {
        launch_template_id = aws_launch_template.worker.id
        version            = aws_launch_template.worker.latest_version
      }
      dynamic "override" {
        for_each = var.worker_instance_types
        content {
          instance_type = override.value
        }
      }
    }
  }

  # the hook exists before the first instance does, so no worker ever terminates without a drain
  initial_lifecycle_hook {
    name                 = "drain"
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    heartbeat_timeout    = var.lifecycle_heartbeat_timeout_seconds
    default_result       = "CONTINUE"
  }

  dynamic "tag" {
    for_each = local.tags
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  lifecycle {
    precondition {
      condition     = length(local.zones) == 1
      error_message = "subnet_ids: all subnets must be in one availability zone (EBS volumes attach only within their zone); they are in ${join(", ", local.zones)}. Instantiate the module once per zone."
    }
    # the scaling policies own the desired capacity
    ignore_changes = [desired_capacity]
  }
}

# Backlog per worker = visible jobs / in-service workers, tracked towards a target.
resource "aws_autoscaling_policy" "backlog" {
  name                   = "${var.name}-backlog-per-worker"
  autoscaling_group_name = aws_autoscaling_group.workers.name
  policy_type            = "TargetTrackingScaling"

  target_tracking_configuration {
    target_value = var.target_backlog_per_instance
    # with --idle-exit the workers leave on their own, idle ones only: scaling in here could pick
    # nothing better, so leave scale-in to them
    disable_scale_in = var.idle_exit_seconds > 0

    customized_metric_specification {
      metrics {
        id          = "jobs"
        label       = "visible jobs"
        return_data = false
        metric_stat {
          stat = "Sum"
          metric {
            namespace   = "AWS/SQS"
            metric_name = "ApproximateNumberOfMessagesVisible"
            dimensions {
              name  = "QueueName"
              value = aws_sqs_queue.jobs.name
            }
          }
        }
      }
      metrics {
        id          = "workers"
        label       = "in-service workers"
        return_data = false
        metric_stat {
          stat = "Average"
          metric {
            namespace   = "AWS/AutoScaling"
            metric_name = "GroupInServiceInstances"
            dimensions {
              name  = "AutoScalingGroupName"
              value = aws_autoscaling_group.workers.name
            }
          }
        }
      }
      metrics {
        id          = "backlog"
        label       = "visible jobs per in-service worker"
        expression  = "jobs / workers"
        return_data = true
      }
    }
  }
}

# Target tracking cannot leave zero (jobs / 0 workers has no value): one worker when jobs wait and
# none is in service. ExactCapacity 1 is idempotent while that first worker boots.
resource "aws_autoscaling_policy" "from_zero" {
  name                   = "${var.name}-scale-from-zero"
  autoscaling_group_name = aws_autoscaling_group.workers.name
  policy_type            = "SimpleScaling"
  adjustment_type        = "ExactCapacity"
  scaling_adjustment     = 1
  cooldown               = 60
}

resource "aws_cloudwatch_metric_alarm" "jobs_without_workers" {
  alarm_name          = "${var.name}-jobs-without-workers"
  alarm_description   = "jobs wait and no worker is in service"
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = 1
  evaluation_periods  = 1
  alarm_actions       = [aws_autoscaling_policy.from_zero.arn]
  tags                = local.tags

  metric_query {
    id          = "starved"
    expression  = "IF(jobs > 0 AND workers < 1, 1, 0)"
    label       = "jobs waiting with no worker"
    return_data = true
  }
  metric_query {
    id = "jobs"
    metric {
      namespace   = "AWS/SQS"
      metric_name = "ApproximateNumberOfMessagesVisible"
      period      = 60
      stat        = "Sum"
      dimensions = {
        QueueName = aws_sqs_queue.jobs.name
      }
    }
  }
  metric_query {
    id = "workers"
    metric {
      namespace   = "AWS/AutoScaling"
      metric_name = "GroupInServiceInstances"
      period      = 60
      stat        = "Average"
      dimensions = {
        AutoScalingGroupName = aws_autoscaling_group.workers.name
      }
    }
  }
}
