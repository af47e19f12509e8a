"""Builder and worker images for the clouds: `cloudbuild image build|upload` (see docs/images.md).

Host side: `tree` (debootstrap + configuration), `content` (what the builder/worker add), `disk`
(ESP + root through systemd-repart, systemd-boot), `upload_ec2`, `upload_openstack`. Guest side:
`bootfetch` (stdlib only, installed into the image). Keep this file import-free: the guest
imports `cloudbuild.images.bootfetch` through it.
"""
