variable "name" {
  description = "Name of the fleet: prefixes every resource."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{0,30}[a-z0-9]$", var.name))
    error_message = "name: 2-32 characters of a-z, 0-9 and '-', starting with a letter."
  }
}

variable "worker_count" {
  description = "Number of worker servers."
  type        = number
  default     = 2

  validation {
    condition     = var.worker_count >= 0 && floor(var.worker_count) == var.worker_count
    error_message = "worker_count: a whole number, 0 or more."
  }
}

variable "worker_image_id" {
  description = "Glance image of the worker (`cloudbuild image build worker --cloud openstack`)."
  type        = string

  validation {
    condition     = can(regex("^[0-9a-f-]{36}$", var.worker_image_id))
    error_message = "worker_image_id: a Glance image UUID (upload it with `cloudbuild image upload openstack`)."
  }
}

variable "builder_image_id" {
  description = "Glance image of the builders the workers launch (`cloudbuild image build builder --cloud openstack`)."
  type        = string

  validation {
    condition     = can(regex("^[0-9a-f-]{36}$", var.builder_image_id))
    error_message = "builder_image_id: a Glance image UUID (upload it with `cloudbuild image upload openstack`)."
  }
}

variable "worker_flavor" {
  description = "Flavor of the worker servers."
  type        = string
}

variable "builder_flavor" {
  description = "Flavor of the builders (--openstack-flavor)."
  type        = string
}

variable "network_id" {
  description = "Network (UUID) of workers and builders."
  type        = string

  validation {
    condition     = can(regex("^[0-9a-f-]{36}$", var.network_id))
    error_message = "network_id: a Neutron network UUID."
  }
}

variable "key_pair_public_key" {
  description = "Optional SSH public key for the workers (no key: no SSH access at all)."
  type        = string
  default     = null
}

variable "application_credential_id" {
  description = "Keystone application credential the workers use (rendered into clouds.yaml by cloud-init)."
  type        = string
  sensitive   = true
}

variable "application_credential_secret" {
  description = "Secret of the application credential."
  type        = string
  sensitive   = true
}

variable "auth_url" {
  description = "Keystone URL (https://.../v3)."
  type        = string

  validation {
    condition     = can(regex("^https?://", var.auth_url))
    error_message = "auth_url: the Keystone v3 URL, such as https://keystone.example.org:5000/v3."
  }
}

variable "region" {
  description = "OpenStack region name."
  type        = string
  default     = "RegionOne"
}

variable "redis_url" {
  description = "The job queue, redis://HOST:PORT/STREAM (or rediss://, redis+sentinel://). Null with create_redis makes one."
  type        = string
  default     = null

  validation {
    condition     = var.redis_url == null || can(regex("^(redis|rediss|redis\\+sentinel)://[^/]+/[A-Za-z0-9._:-]+$", var.redis_url))
    error_message = "redis_url: redis://HOST:PORT/STREAM, rediss://... or redis+sentinel://.../STREAM."
  }
}

variable "create_redis" {
  description = "Make a Redis server for the queue (from redis_image_id) instead of using redis_url."
  type        = bool
  default     = false

  validation {
    condition     = var.create_redis ? (var.redis_url == null && var.redis_image_id != null && var.redis_flavor != null) : var.redis_url != null
    error_message = "create_redis: either give redis_url, or set create_redis = true with redis_image_id and redis_flavor (and no redis_url)."
  }
}

variable "redis_image_id" {
  description = "Image with redis-server enabled, when create_redis is true."
  type        = string
  default     = null
}

variable "redis_flavor" {
  description = "Flavor of the Redis server, when create_redis is true."
  type        = string
  default     = null
}

variable "slots" {
  description = "Builds each worker runs at once."
  type        = number
  default     = 2

  validation {
    condition     = var.slots >= 1 && var.slots <= 32 && floor(var.slots) == var.slots
    error_message = "slots: a whole number from 1 to 32."
  }
}

variable "drain_timeout_seconds" {
  description = "How long a stopping worker lets builds finish (--drain-timeout); systemd's stop timeout is set above it."
  type        = number
  default     = 1800

  validation {
    condition     = var.drain_timeout_seconds >= 0 && var.drain_timeout_seconds <= 86400
    error_message = "drain_timeout_seconds: from 0 to 86400."
  }
}

variable "lease_seconds" {
  description = "Job lease, renewed while a build runs (--lease)."
  type        = number
  default     = 300

  validation {
    condition     = var.lease_seconds >= 30
    error_message = "lease_seconds: 30 or more."
  }
}

variable "build_timeout_seconds" {
  description = "Longest build (--build-timeout)."
  type        = number
  default     = 7200

  validation {
    condition     = var.build_timeout_seconds >= 60
    error_message = "build_timeout_seconds: 60 or more."
  }
}

variable "builder_pool_size" {
  description = "Stopped builders each worker keeps for reuse (--openstack-pool)."
  type        = number
  default     = 0

  validation {
    condition     = var.builder_pool_size >= 0 && var.builder_pool_size <= 16
    error_message = "builder_pool_size: from 0 to 16."
  }
}

variable "allowed_job_options" {
  description = "Build options a job may set (cloudbuild worker --allow)."
  type        = list(string)
  default     = ["vm-memory", "jobs", "vm-disk-size", "build-timeout"]

  validation {
    condition     = alltrue([for o in var.allowed_job_options : !contains(["vm-type", "vm-volumes", "root"], o) && !startswith(o, "openstack-")])
    error_message = "allowed_job_options: vm-type, vm-volumes, root and the openstack-* options are the operator's and cannot be given to jobs."
  }
}

variable "results_prefix" {
  description = "Object prefix of the results in the container (the store is swift://CONTAINER/PREFIX)."
  type        = string
  default     = "cloudbuild"

  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9._-]*$", var.results_prefix))
    error_message = "results_prefix: letters, digits, '.', '_' and '-', no slashes."
  }
}
