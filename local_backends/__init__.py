"""Local hypervisor backends: each a local-volume variant of the Volume/Backend interfaces."""
