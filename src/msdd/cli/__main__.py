"""`python -m msdd.cli` (how torchrun starts the command): the same as `msdd`."""

import sys

from msdd.cli import main

sys.exit(main())
