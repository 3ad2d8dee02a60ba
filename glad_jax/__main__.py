"""`python -m glad_jax ...` is the `glad` command."""

import sys

from glad_jax.cli import main

sys.exit(main())
