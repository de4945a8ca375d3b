"""``embtune <stage> ...`` (the console script) and ``python -m embtune``: a thin dispatcher to ``python -m <stage>``.

It sits above the stages (it imports them by name), beside the pipeline; ``embtune.cli`` holds what every entry
point shares and imports no stage.
"""

from __future__ import annotations

import importlib
import sys

from embtune.cli import STAGES


def main(argv: list[str] | None = None) -> int:
    """``embtune <stage> ...``: a thin dispatcher to ``python -m <stage>``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print("usage: embtune {" + ",".join(STAGES) + "} CONFIG [key=value ...]\n")
        for name, text in STAGES.items():
            print(f"  {name:10s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name = argv[0]
    module = importlib.import_module("embtune.pipeline" if name == "pipeline" else name if "." in name
                                     else f"{name}.__main__")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
