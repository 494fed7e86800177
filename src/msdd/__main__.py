"""`python -m msdd`: the same as the `msdd` command."""

import sys

from msdd.cli import main

sys.exit(main())
