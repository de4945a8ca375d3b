"""accelerate launch -m embtune.train CONFIG [key=value ...]  (or python -m embtune.train ...): fine-tune the model."""

import sys

from embtune.cli import stage_main
from embtune.train.recipe import run


def main(argv=None) -> int:
    return stage_main("train", run, ["train", "tracking"], argv)


if __name__ == "__main__":
    sys.exit(main())
