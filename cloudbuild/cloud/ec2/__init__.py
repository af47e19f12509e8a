"""`--vm-type ec2`: EBS volumes and builder instances (boto3). Same module roles as every cloud
package (docs/new-cloud.md): api, identity (IMDS), volume, devices (NVMe), builder (boot hook),
console, gc, backend."""
