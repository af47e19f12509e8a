"""Cloud backends: the volumes and build machines of `--vm-type ec2` and `--vm-type openstack`.

Policy shared by every cloud lives once in `common.py` (tags, RFC 3339 leases, build locks and the
seen-twice leak sweep over a `GcAdapter`); each cloud module is a thin adapter that provides
`gc_adapter()` for `cloudbuild gc --vm-type <cloud>`.
"""
