"""`--vm-type openstack`: Cinder volumes and builder servers (openstacksdk). Same module roles as
every cloud package (docs/new-cloud.md): api, identity (metadata service), volume, devices (virtio
serial), builder (server and boot hook), console, gc, backend."""
