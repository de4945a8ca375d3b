"""python -m embtune.eval CONFIG [key=value ...]: base vs fine-tuned vs BM25, BEIR/MTEB metrics."""

import sys

from embtune.cli import stage_main
from embtune.eval.run import run


def main(argv=None) -> int:
    return stage_main("eval", run, ["eval", "bm25", "tracking", "compute"], argv)


if __name__ == "__main__":
    sys.exit(main())
