"""Shared command line for the stages, and the ``embtune`` console script that dispatches to them.

Every stage is ``python -m embtune.<stage> CONFIG.yaml [section.key=value ...] [--force]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import types
from typing import Callable, Literal, Union, get_args, get_origin, get_type_hints

from embtune.compute import activate
from embtune.config import ConfigError, InputError
from embtune.dataio import DataError
from embtune.schema import load_config

STAGES = {
    "init": "look at a folder or file of your documents and write a commented recipe (embtune.yaml) for it",
    "data_prep": "load, validate, (synthesize,) chunk and mine hard negatives into a training table",
    "train": "fine-tune with sentence-transformers' trainer (run under `accelerate launch -m embtune.train`)",
    "eval": "FAISS retrieval eval with BEIR/MTEB metrics: base vs fine-tuned vs BM25",
    "serve": "export the fine-tuned model as a bundle (and serve it)",
    "pipeline": "run data_prep -> train -> eval -> export, skipping stages whose manifest matches",
    "train.cross_encoder": "train a cross-encoder teacher on data_prep's table (CrossEncoderTrainer)",
    "eval.choose": "rank candidate base models, BM25 and hybrids on your dev queries (before fine-tuning)",
    "eval.rag": "answer-level check: retrieve, answer with the llm section's model, judge faithfulness",
}


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in ``cls``'s source: its inline comment, else the ``#`` lines right above it.

    dataclasses keep no per-field docs (PEP 224 was rejected), so the help reads them from the source, where the
    project writes them anyway; a field without a comment gets none.
    """
    import inspect
    import io
    import tokenize

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    block: list[str] = []
    for text in source.splitlines():
        stripped = text.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        field_name = re.match(r"\s+(\w+)\s*:(?!\s*$)", text)
        if field_name and not stripped.startswith(("def ", "return", "raise", "if ", "for ", "elif ")):
            inline = ""
            try:  # a '#' outside any string literal
                tokens = tokenize.generate_tokens(io.StringIO(stripped + "\n").readline)
                inline = next((t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT), "")
            except (tokenize.TokenError, SyntaxError):
                pass
            if inline or block:
                comments.setdefault(field_name.group(1), inline or " ".join(block))
        block = []
    return comments


def _one_line(text: str, width: int = 110) -> str:
    """The first sentence of a comment, cut to ``width`` characters."""
    text = text.strip("-# ").strip()
    first = re.split(r"(?<!e\.g)(?<!i\.e)(?<=\.)\s", text, maxsplit=1)[0].rstrip(";:,")
    return first if len(first) <= width else first[: width - 3].rstrip() + "..."


def type_name(tp) -> str:
    """A field's type as help shows it: a Literal's choices, ``X | None``, ``list[int]``."""
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in get_args(tp))
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in get_args(tp))}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def describe_class(cls: type, prefix: str) -> list[str]:
    """Help lines for every key of section ``cls`` (dotted under ``prefix``), nested sections expanded."""
    hints, comments = get_type_hints(cls), field_comments(cls)
    lines, nested = [], []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((f.name, tp))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        line = f"  {prefix}.{f.name} ({type_name(tp)}) = {default!r}"
        if f.name in comments:
            line += f"\n      {_one_line(comments[f.name])}"
        lines.append(line)
    for name, tp in nested:
        lines.append(f"\n[{prefix}.{name}]  {(tp.__doc__ or '').strip().splitlines()[0]}")
        lines += describe_class(tp, f"{prefix}.{name}")
    return lines


def describe_sections(sections: list[str]) -> str:
    """Help text listing each key of the given sections (dotted), its type or choices, default and comment."""
    from embtune.schema import Config

    lines = []
    hints = get_type_hints(Config)
    for name in sections:
        cls = hints[name]
        if not dataclasses.is_dataclass(cls):  # a top-level key such as run_dir or seed
            continue
        lines.append(f"\n[{name}]  {(cls.__doc__ or '').strip().splitlines()[0]}")
        lines += describe_class(cls, name)
    top = [f"{f.name} ({type_name(hints[f.name])}) = {f.default!r}" for f in dataclasses.fields(Config)
           if f.init and not dataclasses.is_dataclass(hints[f.name])]
    lines.append("\nTop-level keys: " + ", ".join(top) + ".")
    return "\n".join(lines)


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )


def stage_main(stage: str, run: Callable, sections: list[str], argv: list[str] | None = None,
               commands: str = "") -> int:
    """Parse ``CONFIG [key=value ...]`` and call ``run(cfg, force=...)``; config errors exit 2 with the message.

    ``sections`` are the ones ``--help`` lists (those the stage reads); ``commands`` describes sub-commands.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m embtune.{stage}",
        description=f"embtune {stage}: {STAGES[stage]}." + (f"\n\n{commands}" if commands else ""),
        epilog="Config keys (override any with section.key=value):" + describe_sections(sections),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", nargs="?", help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=3e-5")
    parser.add_argument("--force", action="store_true", help="rerun even if the stage's manifest matches")
    args, cfg = parse_config_args(parser, argv)
    if cfg is None:
        return 2
    return exit_code(lambda: run(cfg, force=args.force), debug=args.debug)


def exit_code(work: Callable[[], object], debug: bool = False) -> int:
    """Run an entry point's work; an input problem is one line on stderr and exit code 2, not a traceback.

    Input problems are a recipe that does not fit its schema or its stage (:class:`ConfigError`), bad data
    (:class:`DataError`, whose message starts with ``file:line``) and a missing input file or upstream output
    (``FileNotFoundError``, whose message names the path), and an input an entry point cannot use
    (:class:`InputError`: a bundle, a model that is not on disk). Anything else is a bug and keeps its traceback;
    ``debug`` (the ``--debug`` flag) keeps it for input problems too.
    """
    if debug:
        work()
        return 0
    try:
        work()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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
    if not any(action.dest == "debug" for action in parser._actions):
        parser.add_argument("--debug", action="store_true", help="show the traceback of an input error too")
    args = parser.parse_args(argv)
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides.insert(0, args.config)
        args.config = None
    setup_logging()
    try:
        cfg = load_config(args.config, args.overrides, sections)
    except ConfigError as err:
        if args.debug:
            raise
        print(f"config error: {err}", file=sys.stderr)
        return args, None
    activate(cfg.compute)  # every corpus encode of this process goes through the recipe's engine
    return args, cfg
