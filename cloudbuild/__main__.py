"""`python -m cloudbuild` is the `cloudbuild` command."""

import sys

from cloudbuild.cli import main

sys.exit(main())
