"""python -m embtune.serve CONFIG [key=value ...]     export the fine-tuned model as a bundle (the last stage)
python -m embtune.serve up [CONFIG] [serve.key=value ...] [--bundle DIR]
                                            serve a bundle: /v1/embeddings, /search, /health (see up --help)
"""

import argparse
import dataclasses
import sys
from pathlib import Path

from embtune.cli import describe_sections, parse_config_args, stage_main
from embtune.sections.serve import ServeConfig
from embtune.serve.export import run

UP_EXAMPLES = """
examples:
  python -m embtune.serve up --bundle runs/demo/bundle
  python -m embtune.serve up configs/demo.yaml                       # serve.bundle_dir, else the export stage's bundle
  python -m embtune.serve up configs/demo.yaml serve.port=8080 serve.threads=1 serve.microbatch=false

/search serves the bundle's retriever.json (the retrieval system eval recommended); see docs/serve.md."""


def build_parser() -> argparse.ArgumentParser:
    """``python -m embtune.serve up [CONFIG] [serve.key=value ...] [--bundle DIR]``: the recipe's ``serve`` section,
    with
    dotted overrides through the same parser as every stage (``embtune.cli.parse_config_args``)."""
    parser = argparse.ArgumentParser(
        prog="python -m embtune.serve up",
        description="Serve an embtune export bundle over HTTP: /v1/embeddings, /search, "
        "/health. Settings come from the recipe's serve section; override any with serve.key=value.",
        epilog="Config keys:" + describe_sections(["serve"]) + "\n" + UP_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML recipe (optional: defaults plus overrides without one)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. serve.port=8080 serve.api_key=KEY")
    parser.add_argument("--bundle", default="", help="the export bundle folder; same as serve.bundle_dir=DIR")
    return parser


def hint_old_flags(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """``--port 8080`` was a flag before the serve section was the one source: say what to write instead."""
    fields = {f.name for f in dataclasses.fields(ServeConfig)}
    for arg in argv:
        name = arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") else ""
        if name.startswith("no_") and name[3:] in fields:
            parser.error(f"{arg}: settings are config keys now; write serve.{name[3:]}=false")
        if name in fields:
            parser.error(f"{arg}: settings are config keys now; write serve.{name}=VALUE")


def config_from_args(argv: list[str] | None) -> ServeConfig | None:
    """The ``serve`` section the command line describes, or None after printing a config error (exit 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    hint_old_flags(build_parser(), argv)
    # Only the sections serving reads are checked: a bundle needs no data.path.
    args, cfg = parse_config_args(build_parser(), argv, sections=["run_dir", "export", "serve"])
    if cfg is None:
        return None
    serve = cfg.serve
    if args.bundle:
        serve.bundle_dir = args.bundle
    elif not serve.bundle_dir:  # the export stage's bundle of this recipe
        serve.bundle_dir = cfg.export.out_dir or str(Path(cfg.run_dir) / "bundle")
    return serve


def up(argv: list[str] | None = None) -> int:
    """``python -m embtune.serve up ...``: serve until interrupted; 2 on a config error."""
    cfg = config_from_args(argv)
    if cfg is None:
        return 2
    from embtune.serve.app import run_server
    from embtune.serve.bundle import BundleMismatch, check_backend

    try:
        check_backend(cfg.bundle_dir, cfg.backend)  # before the server logs anything: the refusal is one line
        run_server(cfg)
    except BundleMismatch as err:  # which setting differs from the bundle's, and what to set
        print(f"embtune serve up: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "up":
        return up(argv[1:])
    return stage_main("serve", run, ["export", "serve"], argv)


if __name__ == "__main__":
    sys.exit(main())
