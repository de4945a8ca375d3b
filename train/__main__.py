"""accelerate launch -m train CONFIG [key=value ...]  (or python -m train ...): fine-tune the model."""

import sys

from embtune.cli import stage_main
from train.recipe import run


def main(argv=None) -> int:
    return stage_main("train", run, ["train", "tracking"], argv)


if __name__ == "__main__":
    sys.exit(main())
