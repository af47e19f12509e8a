variable "name" {
  description = "Name of the fleet: prefixes every resource and is the value of the cloudbuild:fleet tag."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,30}[a-z0-9]$", var.name))
    error_message = "name: 2-32 characters of a-z, 0-9 and '-', starting with a letter (it becomes part of bucket, queue and role names)."
  }
}

variable "worker_ami_id" {
  description = "AMI of the worker image (`cloudbuild image build worker --cloud ec2`); never built by Terraform."
  type        = string

  validation {
    condition     = can(regex("^ami-[0-9a-f]{8,17}$", var.worker_ami_id))
    error_message = "worker_ami_id: expected an AMI id such as ami-0123456789abcdef0 (build it with `cloudbuild image build worker --cloud ec2`)."
  }
}

variable "builder_ami_id" {
  description = "AMI of the builder image (`cloudbuild image build builder --cloud ec2`) that workers launch per build."
  type        = string

  validation {
    condition     = can(regex("^ami-[0-9a-f]{8,17}$", var.builder_ami_id))
    error_message = "builder_ami_id: expected an AMI id such as ami-0123456789abcdef0 (build it with `cloudbuild image build builder --cloud ec2`)."
  }
}

variable "subnet_ids" {
  description = "Subnets for workers and builders, all in ONE availability zone (EBS volumes attach only within their zone). For several zones, instantiate the module once per zone (for_each)."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) > 0 && alltrue([for s in var.subnet_ids : can(regex("^subnet-[0-9a-f]{8,17}$", s))])
    error_message = "subnet_ids: give at least one subnet id (subnet-...), all in the same availability zone."
  }
}

variable "worker_instance_types" {
  description = "Instance types for workers, in order of preference (Nitro types: volumes appear as NVMe)."
  type        = list(string)
  default     = ["m6i.large", "m5.large"]

  validation {
    condition     = length(var.worker_instance_types) > 0
    error_message = "worker_instance_types: give at least one instance type."
  }
}

variable "builder_instance_type" {
  description = "Instance type of the builders the workers launch (--ec2-instance-type)."
  type        = string
  default     = "t3.medium"
}

variable "spot_percentage" {
  description = "Share of workers above on_demand_base_capacity that run on spot (0-100). Workers drain on a rebalance notice and release their jobs on an interruption notice."
  type        = number
  default     = 0

  validation {
    condition     = var.spot_percentage >= 0 && var.spot_percentage <= 100
    error_message = "spot_percentage: a number from 0 to 100."
  }
}

variable "on_demand_base_capacity" {
  description = "Workers that always run on demand before any spot share applies."
  type        = number
  default     = 0

  validation {
    condition     = var.on_demand_base_capacity >= 0 && floor(var.on_demand_base_capacity) == var.on_demand_base_capacity
    error_message = "on_demand_base_capacity: a whole number, 0 or more."
  }
}

variable "min_size" {
  description = "Fewest workers; 0 lets the fleet scale to zero."
  type        = number
  default     = 0

  validation {
    condition     = var.min_size >= 0 && floor(var.min_size) == var.min_size
    error_message = "min_size: a whole number, 0 or more (0 = scale to zero)."
  }
}

variable "max_size" {
  description = "Most workers."
  type        = number
  default     = 10

  validation {
    condition     = var.max_size >= 1 && var.max_size >= var.min_size && floor(var.max_size) == var.max_size
    error_message = "max_size: a whole number, at least 1 and at least min_size."
  }
}

variable "slots" {
  description = "Builds each worker runs at once (cloudbuild worker --slots)."
  type        = number
  default     = 2

  validation {
    condition     = var.slots >= 1 && var.slots <= 32 && floor(var.slots) == var.slots
    error_message = "slots: a whole number from 1 to 32."
  }
}

variable "build_timeout_seconds" {
  description = "Longest build (--build-timeout). SQS caps a message's invisibility at 12 h, so at most 43200 minus the drain margin."
  type        = number
  default     = 7200

  validation {
    condition     = var.build_timeout_seconds >= 60 && var.build_timeout_seconds <= 39600
    error_message = "build_timeout_seconds: from 60 to 39600 (SQS keeps a message invisible for at most 12 h; the worker needs the rest for upload and drain)."
  }
}

variable "drain_timeout_seconds" {
  description = "How long a draining worker lets running builds finish before releasing them (--drain-timeout)."
  type        = number
  default     = 1800

  validation {
    condition     = var.drain_timeout_seconds >= 0 && var.drain_timeout_seconds <= 6600
    error_message = "drain_timeout_seconds: from 0 to 6600 (the termination hook's heartbeat timeout, at most 7200 s, must exceed it)."
  }
}

variable "lifecycle_heartbeat_timeout_seconds" {
  description = "Heartbeat timeout of the termination lifecycle hook; must exceed drain_timeout_seconds so a draining worker is never cut off."
  type        = number
  default     = 2400

  validation {
    condition     = var.lifecycle_heartbeat_timeout_seconds > var.drain_timeout_seconds && var.lifecycle_heartbeat_timeout_seconds <= 7200
    error_message = "lifecycle_heartbeat_timeout_seconds: must be greater than drain_timeout_seconds and at most 7200 (the Auto Scaling limit)."
  }
}

variable "lease_seconds" {
  description = "Job lease (SQS visibility timeout), renewed by the worker while a build runs."
  type        = number
  default     = 300

  validation {
    condition     = var.lease_seconds >= 30 && var.lease_seconds <= 43200
    error_message = "lease_seconds: from 30 to 43200 (the SQS visibility timeout range the worker renews within)."
  }
}

variable "idle_exit_seconds" {
  description = "A worker idle this long terminates itself and decrements the group (never below min_size); 0 keeps idle workers and lets target tracking scale in."
  type        = number
  default     = 600

  validation {
    condition     = var.idle_exit_seconds >= 0
    error_message = "idle_exit_seconds: 0 (never) or more seconds."
  }
}

variable "max_receive_count" {
  description = "Deliveries of a job before SQS moves it to the dead-letter queue (the worker's attempts)."
  type        = number
  default     = 3

  validation {
    condition     = var.max_receive_count >= 1 && var.max_receive_count <= 1000 && floor(var.max_receive_count) == var.max_receive_count
    error_message = "max_receive_count: a whole number from 1 to 1000 (SQS's redrive range)."
  }
}

variable "target_backlog_per_instance" {
  description = "Target of the scaling policy: visible jobs per in-service worker (about slots x builds a worker can start while a new one boots)."
  type        = number
  default     = 4

  validation {
    condition     = var.target_backlog_per_instance > 0
    error_message = "target_backlog_per_instance: a positive number of jobs per worker."
  }
}

variable "results_expiry_days" {
  description = "Days after which results (and their old versions) expire from the bucket."
  type        = number
  default     = 30

  validation {
    condition     = var.results_expiry_days >= 1 && floor(var.results_expiry_days) == var.results_expiry_days
    error_message = "results_expiry_days: a whole number of days, 1 or more."
  }
}

variable "results_prefix" {
  description = "Key prefix of the results in the bucket (the store URL is s3://BUCKET/PREFIX)."
  type        = string
  default     = "cloudbuild"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._-]*$", var.results_prefix))
    error_message = "results_prefix: letters, digits, '.', '_' and '-', no slashes."
  }
}

variable "force_destroy_bucket" {
  description = "Let `terraform destroy` delete a bucket that still holds results (examples and tests only)."
  type        = bool
  default     = false
}

variable "log_retention_days" {
  description = "Retention of the workers' CloudWatch log group."
  type        = number
  default     = 30

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days: one of CloudWatch's values (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653)."
  }
}

variable "worker_root_volume_gb" {
  description = "Size of a worker's own encrypted root volume (the builds' volumes are separate EBS volumes)."
  type        = number
  default     = 20

  validation {
    condition     = var.worker_root_volume_gb >= 8
    error_message = "worker_root_volume_gb: at least 8."
  }
}

variable "imds_hop_limit" {
  description = "IMDSv2 response hop limit; the worker runs on the host, so 1 is enough (2 only if it runs in a container)."
  type        = number
  default     = 1

  validation {
    condition     = var.imds_hop_limit >= 1 && var.imds_hop_limit <= 2
    error_message = "imds_hop_limit: 1 (the worker on the host) or 2 (the worker in a container)."
  }
}

variable "builder_pool_size" {
  description = "Stopped builders each worker keeps for reuse (--ec2-pool); 0 launches one per build."
  type        = number
  default     = 0

  validation {
    condition     = var.builder_pool_size >= 0 && var.builder_pool_size <= 16
    error_message = "builder_pool_size: from 0 to 16."
  }
}

variable "allowed_job_options" {
  description = "Build options a job may set (cloudbuild worker --allow); everything else is the operator's."
  type        = list(string)
  default     = ["vm-memory", "jobs", "vm-disk-size", "build-timeout"]

  validation {
    condition     = alltrue([for o in var.allowed_job_options : !contains(["vm-type", "vm-volumes", "root", "ec2-builder-ami", "ec2-subnet", "ec2-security-group", "ec2-instance-type"], o)])
    error_message = "allowed_job_options: vm-type, vm-volumes, root and the ec2-* options are the operator's and cannot be given to jobs."
  }
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}
