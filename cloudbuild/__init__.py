"""cloudbuild: package builds in virtual machines whose root and swap disks are volumes."""

__version__ = "0.1.0"
