import sys

from embtune.cli import main

sys.exit(main())
