"""`python -m saferl.cli ...`, the same as the `saferl` console script."""

import sys

from saferl.cli.main import main

sys.exit(main())
