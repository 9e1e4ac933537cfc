"""`python -m pipeline.cli ...`: the `progan` command."""

import sys

from pipeline.cli import main

sys.exit(main())
