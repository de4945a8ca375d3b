"""python -m embtune.data_prep CONFIG [key=value ...]: load, validate, chunk, synthesize queries (optional), mine a
table."""

import sys

from embtune.cli import stage_main
from embtune.data_prep.run import run


def main(argv=None) -> int:
    return stage_main("data_prep", run, ["data", "chunking", "llm", "labelfree", "mining", "bm25", "compute"], argv)


if __name__ == "__main__":
    sys.exit(main())
