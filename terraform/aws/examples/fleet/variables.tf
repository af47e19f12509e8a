variable "region" {
  description = "AWS region of the fleet."
  type        = string
  default     = "eu-west-1"
}

variable "zone" {
  description = "The one availability zone of the fleet (EBS volumes attach only within a zone)."
  type        = string
  default     = "eu-west-1a"
}

variable "worker_ami_id" {
  description = "AMI built with `cloudbuild image build worker --cloud ec2` and uploaded with `cloudbuild image upload ec2`."
  type        = string
}

variable "builder_ami_id" {
  description = "AMI built with `cloudbuild image build builder --cloud ec2` and uploaded with `cloudbuild image upload ec2`."
  type        = string
}
