output "queue_url" {
  description = "URL of the job queue (the worker's and submit's --queue is sqs://<this>)."
  value       = aws_sqs_queue.jobs.url
}

output "dead_letter_queue_url" {
  description = "URL of the dead-letter queue: jobs that failed max_receive_count times."
  value       = aws_sqs_queue.dead_letter.url
}

output "bucket" {
  description = "The results bucket."
  value       = aws_s3_bucket.results.bucket
}

output "store_url" {
  description = "The store URL (--store) of this fleet."
  value       = local.store_url
}

output "group_name" {
  description = "The workers' Auto Scaling group."
  value       = aws_autoscaling_group.workers.name
}

output "role_arn" {
  description = "The workers' IAM role."
  value       = aws_iam_role.worker.arn
}

output "log_group" {
  description = "CloudWatch log group of the workers' JSON logs."
  value       = aws_cloudwatch_log_group.worker.name
}

output "builder_security_group_id" {
  description = "Security group of the builders (no ingress, no egress)."
  value       = aws_security_group.builder.id
}

output "submit_command" {
  description = "The command that submits a job to this fleet."
  value       = "cloudbuild submit --queue sqs://${aws_sqs_queue.jobs.url} --store ${local.store_url} RECIPE_OR_JOB.json"
}
