"""``python -m embtune.pipeline CONFIG [key=value ...]``: every stage in one run directory."""

import sys

from embtune.pipeline import main

sys.exit(main())
