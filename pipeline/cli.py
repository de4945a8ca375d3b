"""``embtune <stage> ...``, the console script: a thin dispatcher to ``python -m embtune.<stage>``.

It is wiring (it imports every stage), so it lives here with the pipeline and the report, above the stages; the
core's ``embtune.cli`` holds what every entry point shares and imports no stage. Each stage is imported by a plain
``from ... import`` so that the layering contracts see the edge.
"""

from __future__ import annotations

import sys
from typing import Callable

from embtune.cli import STAGES


def entry_point(name: str) -> Callable[[list[str]], int]:
    """The ``main(argv)`` of one ``embtune <name>`` command."""
    if name == "init":
        from embtune.pipeline.init import main
    elif name == "pipeline":
        from embtune.pipeline import main
    elif name == "data_prep":
        from embtune.data_prep.__main__ import main
    elif name == "train":
        from embtune.train.__main__ import main
    elif name == "train.cross_encoder":
        from embtune.train.cross_encoder import main
    elif name == "eval":
        from embtune.eval.__main__ import main
    elif name == "eval.choose":
        from embtune.eval.choose import main
    elif name == "eval.rag":
        from embtune.eval.rag import main
    elif name == "serve":
        from embtune.serve.__main__ import main
    else:
        raise KeyError(name)
    return main


def main(argv: list[str] | None = None) -> int:
    """``embtune <stage> ...``: the same as ``python -m embtune.<stage> ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in STAGES and not argv[0].startswith("-"):
        from embtune.config import closest_name

        suggestion = closest_name(argv[0], STAGES)
        hint = f"did you mean 'embtune {suggestion}'? " if suggestion else ""
        print(f"embtune: unknown command '{argv[0]}'; {hint}(`embtune --help` lists the commands)", file=sys.stderr)
        return 2
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        print("usage: embtune {" + ",".join(STAGES) + "} CONFIG [key=value ...]\n"
              "       (each is also `python -m embtune.<stage> ...`; training under `accelerate launch -m "
              "embtune.train ...`)\n")
        for name, text in STAGES.items():
            print(f"  {name:20s} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return entry_point(argv[0])(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
