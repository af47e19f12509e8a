output "queue_url" {
  description = "The job queue."
  value       = module.fleet.queue_url
}

output "dead_letter_queue_url" {
  description = "The dead-letter queue."
  value       = module.fleet.dead_letter_queue_url
}

output "bucket" {
  description = "The results bucket."
  value       = module.fleet.bucket
}

output "group_name" {
  description = "The workers' Auto Scaling group."
  value       = module.fleet.group_name
}

output "role_arn" {
  description = "The workers' IAM role."
  value       = module.fleet.role_arn
}

output "submit_command" {
  description = "How to submit a job to this fleet."
  value       = module.fleet.submit_command
}
