"""`python -m vsampler.tools.cli ...`: the `vsampler` command."""

import sys

from vsampler.tools.cli import main

sys.exit(main())
