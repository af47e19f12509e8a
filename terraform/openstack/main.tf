# A cloudbuild worker fleet on OpenStack: worker servers spread by a soft anti-affinity group,
# builders locked away from the network, results in Swift, jobs in Redis Streams.

locals {
  redis_url = var.create_redis ? "redis://${openstack_compute_instance_v2.redis[0].access_ip_v4}:6379/cloudbuild-jobs" : var.redis_url
  store_url = "swift://${openstack_objectstorage_container_v1.results.name}/${var.results_prefix}"

  worker_args = concat(
    [
      "--queue", local.redis_url,
      "--store", local.store_url,
      "--slots", tostring(var.slots),
      "--lease", tostring(var.lease_seconds),
      "--drain-timeout", tostring(var.drain_timeout_seconds),
      "--build-timeout", tostring(var.build_timeout_seconds),
      "--vm-type", "openstack",
      "--openstack-image", var.builder_image_id,
      "--openstack-flavor", var.builder_flavor,
      "--openstack-network", var.network_id,
      "--openstack-security-group", openstack_networking_secgroup_v2.builder.id,
      "--openstack-pool", tostring(var.builder_pool_size),
    ],
    flatten([for o in var.allowed_job_options : ["--allow", o]]),
  )
}

resource "openstack_compute_servergroup_v2" "workers" {
  name     = "${var.name}-workers"
  policies = ["soft-anti-affinity"]
}

# builders: no ingress, no egress (the build runs offline on its volumes)
resource "openstack_networking_secgroup_v2" "builder" {
  name                 = "${var.name}-builder"
  description          = "cloudbuild builders: no ingress, no egress"
  delete_default_rules = true
}

# workers: no ingress; out to the cloud's APIs (HTTPS) and Redis
resource "openstack_networking_secgroup_v2" "worker" {
  name                 = "${var.name}-worker"
  description          = "cloudbuild workers: no ingress; HTTPS and Redis out"
  delete_default_rules = true
}

resource "openstack_networking_secgroup_rule_v2" "worker_https" {
  security_group_id = openstack_networking_secgroup_v2.worker.id
  direction         = "egress"
  ethertype         = "IPv4"
  protocol          = "tcp"
  port_range_min    = 443
  port_range_max    = 443
  remote_ip_prefix  = "0.0.0.0/0"
}

resource "openstack_networking_secgroup_rule_v2" "worker_redis" {
  security_group_id = openstack_networking_secgroup_v2.worker.id
  direction         = "egress"
  ethertype         = "IPv4"
  protocol          = "tcp"
  port_range_min    = 6379
  port_range_max    = 6379
  remote_ip_prefix  = "0.0.0.0/0"
}

resource "openstack_compute_keypair_v2" "workers" {
  count      = var.key_pair_public_key == null ? 0 : 1
  name       = "${var.name}-workers"
  public_key = var.key_pair_public_key
}

resource "openstack_objectstorage_container_v1" "results" {
  name = "${var.name}-results"
}

resource "openstack_compute_instance_v2" "workers" {
  count           = var.worker_count
  name            = "${var.name}-worker-${count.index}"
  image_id        = var.worker_image_id
  flavor_name     = var.worker_flavor
  key_pair        = var.key_pair_public_key == null ? null : openstack_compute_keypair_v2.workers[0].name
  security_groups = [openstack_networking_secgroup_v2.worker.name]
  user_data = templatefile("${path.module}/templates/cloud-init.yaml.tftpl", {
    auth_url          = var.auth_url
    region            = var.region
    credential_id     = var.application_credential_id
    credential_secret = var.application_credential_secret
    worker_args       = local.worker_args
  })
  metadata = {
    "cloudbuild:fleet" = var.name
  }

  network {
    uuid = var.network_id
  }

  scheduler_hints {
    group = openstack_compute_servergroup_v2.workers.id
  }
}

resource "openstack_networking_secgroup_v2" "redis" {
  count                = var.create_redis ? 1 : 0
  name                 = "${var.name}-redis"
  description          = "cloudbuild job queue: Redis from the workers only"
  delete_default_rules = true
}

resource "openstack_networking_secgroup_rule_v2" "redis_from_workers" {
  count             = var.create_redis ? 1 : 0
  security_group_id = openstack_networking_secgroup_v2.redis[0].id
  direction         = "ingress"
  ethertype         = "IPv4"
  protocol          = "tcp"
  port_range_min    = 6379
  port_range_max    = 6379
  remote_group_id   = openstack_networking_secgroup_v2.worker.id
}

resource "openstack_compute_instance_v2" "redis" {
  count           = var.create_redis ? 1 : 0
  name            = "${var.name}-redis"
  image_id        = var.redis_image_id
  flavor_name     = var.redis_flavor
  security_groups = [openstack_networking_secgroup_v2.redis[0].name]

  network {
    uuid = var.network_id
  }
}
