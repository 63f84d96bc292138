"""`python -m fmnist_ext.train` (and `torchrun ... -m fmnist_ext.train`)."""

import sys

from . import main

sys.exit(main())
