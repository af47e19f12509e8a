"""The machine backends (one module per `--vm-type`) and what they share (`vmproc`, `directory`)."""
