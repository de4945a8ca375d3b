"""Shared command line for the stages, and the ``embtune`` console script that dispatches to them.

Every stage is ``python -m embtune.<stage> CONFIG.yaml [section.key=value ...] [--force]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Callable, get_type_hints

from embtune.compute import activate
from embtune.config import ConfigError
from embtune.dataio import DataError
from embtune.schema import load_config

STAGES = {
    "data_prep": "load, validate, (synthesize,) chunk and mine hard negatives into a training table",
    "train": "fine-tune with sentence-transformers' trainer (run under `accelerate launch -m embtune.train`)",
    "eval": "FAISS retrieval eval with BEIR/MTEB metrics: base vs fine-tuned vs BM25",
    "serve": "export the fine-tuned model as a bundle (and serve it)",
    "pipeline": "run data_prep -> train -> eval -> export, skipping stages whose manifest matches",
    "train.cross_encoder": "train a cross-encoder teacher on data_prep's table (CrossEncoderTrainer)",
    "eval.choose": "rank candidate base models, BM25 and hybrids on your dev queries (before fine-tuning)",
}


def describe_sections(sections: list[str]) -> str:
    """Help text listing each config key of the given sections with its type and default."""
    from embtune.schema import Config

    lines = []
    hints = get_type_hints(Config)
    for name in sections:
        cls = hints[name]
        lines.append(f"\n[{name}]  {(cls.__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            tp = get_type_hints(cls)[f.name]
            tp_name = getattr(tp, "__name__", str(tp)).replace("typing.", "")
            lines.append(f"  {name}.{f.name} ({tp_name}) = {default!r}")
    return "\n".join(lines)


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def stage_main(stage: str, run: Callable, sections: list[str], argv: list[str] | None = None) -> int:
    """Parse ``CONFIG [key=value ...]`` and call ``run(cfg, force=...)``; config errors exit 2 with the message."""
    parser = argparse.ArgumentParser(
        prog=f"python -m embtune.{stage}",
        description=f"embtune {stage}: {STAGES[stage]}.",
        epilog="Config keys (override any with section.key=value):" + describe_sections(sections)
        + "\n\nTop-level keys: run_dir (str), seed (int).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=3e-5")
    parser.add_argument("--force", action="store_true", help="rerun even if the stage's manifest matches")
    args, cfg = parse_config_args(parser, argv)
    if cfg is None:
        return 2
    return exit_code(lambda: run(cfg, force=args.force))


def exit_code(work: Callable[[], object]) -> int:
    """Run an entry point's work; an input problem is one line on stderr and exit code 2, not a traceback.

    Input problems are a recipe that does not fit its schema or its stage (:class:`ConfigError`), bad data
    (:class:`DataError`, whose message starts with ``file:line``) and a missing input file or upstream output
    (``FileNotFoundError``, whose message names the path). Anything else is a bug and keeps its traceback.
    """
    try:
        work()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"data error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        detail = f"{err.strerror}: {err.filename}" if err.filename and err.strerror else str(err)
        print(f"missing input: {detail}", file=sys.stderr)
        return 2
    return 0


def parse_config_args(parser: argparse.ArgumentParser, argv: list[str] | None, sections: list[str] | None = None):
    """Parse ``CONFIG [key=value ...]`` (positionals ``config`` and ``overrides``) and load the recipe.

    A first positional that is an override rather than a YAML file means "defaults plus overrides". ``sections``:
    the only sections whose constraints are checked (see ``load_config``). Returns ``(args, cfg)``, with ``cfg``
    None after printing the config error (callers exit 2).
    """
    args = parser.parse_args(argv)
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)
        args.config = None
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides, sections)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return args, None
    activate(cfg.compute)  # every corpus encode of this process goes through the recipe's engine
    return args, cfg
