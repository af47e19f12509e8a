provider "openstack" {
  cloud = var.cloud
}

module "fleet" {
  source = "../.."

  name                          = "cbexample"
  worker_count                  = 2
  worker_image_id               = var.worker_image_id
  builder_image_id              = var.builder_image_id
  worker_flavor                 = "m1.medium"
  builder_flavor                = "m1.small"
  network_id                    = var.network_id
  auth_url                      = var.auth_url
  application_credential_id     = var.application_credential_id
  application_credential_secret = var.application_credential_secret
  redis_url                     = "redis://redis.internal:6379/cloudbuild-jobs"
}

output "submit_command" {
  description = "How to submit a job to this fleet."
  value       = module.fleet.submit_command
}
