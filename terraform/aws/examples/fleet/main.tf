# A small fleet in a VPC of its own: one private subnet, workers reach the AWS APIs through VPC
# endpoints would be the next step; this example keeps the network minimal.

provider "aws" {
  region = var.region
}

resource "aws_vpc" "fleet" {
  #checkov:skip=CKV2_AWS_11:flow logs belong to the operator's network account; this VPC is an example
  cidr_block           = "10.42.0.0/16"
  enable_dns_support   = true
  enable_dns_hostnames = true
  tags                 = { Name = "cloudbuild-example" }
}

# lock the VPC's default security group down (no rules at all)
resource "aws_default_security_group" "fleet" {
  vpc_id = aws_vpc.fleet.id
}

resource "aws_subnet" "fleet" {
  vpc_id            = aws_vpc.fleet.id
  cidr_block        = "10.42.1.0/24"
  availability_zone = var.zone
  tags              = { Name = "cloudbuild-example-${var.zone}" }
}

module "fleet" {
  source = "../.."

  name                 = "cbexample"
  worker_ami_id        = var.worker_ami_id
  builder_ami_id       = var.builder_ami_id
  subnet_ids           = [aws_subnet.fleet.id]
  min_size             = 0
  max_size             = 3
  slots                = 2
  spot_percentage      = 50
  force_destroy_bucket = true
}
