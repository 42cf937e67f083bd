"""`python -m bpwopt.cli` runs the command line."""

import sys

from bpwopt.cli.main import main

sys.exit(main())
