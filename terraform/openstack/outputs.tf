output "queue_url" {
  description = "The job queue (--queue)."
  value       = local.redis_url
}

output "store_url" {
  description = "The results store (--store)."
  value       = local.store_url
}

output "container" {
  description = "The Swift container of the results."
  value       = openstack_objectstorage_container_v1.results.name
}

output "worker_ids" {
  description = "The worker servers."
  value       = openstack_compute_instance_v2.workers[*].id
}

output "builder_security_group_id" {
  description = "Security group of the builders (no ingress, no egress)."
  value       = openstack_networking_secgroup_v2.builder.id
}

output "submit_command" {
  description = "The command that submits a job to this fleet."
  value       = "cloudbuild submit --queue ${local.redis_url} --store ${local.store_url} RECIPE_OR_JOB.json"
}
