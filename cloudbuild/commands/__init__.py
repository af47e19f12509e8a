"""The subcommands of `cloudbuild` that are not owned by a subject module."""
