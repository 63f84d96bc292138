"""`python -m fmnist_ext.benchmark ...`: the benchmark's command line (cli.py)."""

import sys

from .cli import main

sys.exit(main())
