"""python -m serve CONFIG [key=value ...]: export the fine-tuned model as a bundle."""

import sys

from embtune.cli import stage_main
from serve.export import run


def main(argv=None) -> int:
    return stage_main("serve", run, ["export"], argv)


if __name__ == "__main__":
    sys.exit(main())
