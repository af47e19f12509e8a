variable "cloud" {
  description = "Entry of clouds.yaml Terraform uses."
  type        = string
  default     = "openstack"
}

variable "worker_image_id" {
  description = "Glance image id of the worker image."
  type        = string
}

variable "builder_image_id" {
  description = "Glance image id of the builder image."
  type        = string
}

variable "network_id" {
  description = "Network of the fleet."
  type        = string
}

variable "auth_url" {
  description = "Keystone v3 URL."
  type        = string
}

variable "application_credential_id" {
  description = "Application credential the workers use."
  type        = string
  sensitive   = true
}

variable "application_credential_secret" {
  description = "Its secret."
  type        = string
  sensitive   = true
}
