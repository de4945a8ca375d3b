"""The pipeline: data_prep -> train -> eval -> export, in one run directory.

    python -m embtune.pipeline configs/demo.yaml [key=value ...]
    embtune pipeline configs/demo.yaml --launch "accelerate launch --num_processes 2"

Each stage skips itself when its manifest matches (same config section, same input hashes); a change reruns that
stage, and the stages after it see new input hashes and rerun too. The run directory also gets the resolved recipe
(``config.yaml``) and, at the end, the run report ``report/index.html`` (``pipeline/report.py``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path

from embtune.cli import exit_code, parse_config_args

logger = logging.getLogger("embtune.pipeline")

STAGE_ORDER = ("data_prep", "train", "eval", "export")


class StageFailed(RuntimeError):
    """A stage launched in its own processes exited non-zero."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = returncode


def run(cfg, config_path: str | None, overrides: list[str], launch: str = "", force: bool = False,
        stages: tuple[str, ...] = STAGE_ORDER) -> dict[str, float]:
    # Imported here, not at the top: `python -m embtune.pipeline.report` would otherwise find its module already
    # imported by this package and print runpy's RuntimeWarning before its own output.
    from embtune.data_prep.run import run as data_prep_run
    from embtune.eval.run import run as eval_run
    from embtune.pipeline.report import build_report, write_config
    from embtune.serve.export import run as export_run
    from embtune.train.recipe import run as train_run

    runners = {"data_prep": data_prep_run, "train": train_run, "eval": eval_run, "export": export_run}
    wall = {}
    write_config(cfg, cfg.run_dir, overrides)
    for name in stages:
        start = time.time()
        logger.info("=== stage %s ===", name)
        if name == "train" and launch:
            # Multi-process training runs in its own processes; it skips itself the same way when up to date.
            cmd = [*shlex.split(launch), "-m", "embtune.train", *([config_path] if config_path else []), *overrides]
            cmd += ["--force"] if force else []
            logger.info("launching: %s", shlex.join(cmd))
            done = subprocess.run(cmd)
            if done.returncode:  # the launched stage has said why on stderr
                raise StageFailed(f"stage train: `{shlex.join(cmd)}` exited with {done.returncode}", done.returncode)
        else:
            runners[name](cfg, force=force)
        wall[name] = round(time.time() - start, 1)
    logger.info("pipeline done in %.0f s: %s", sum(wall.values()), wall)
    logger.info("run report: %s", build_report(cfg.run_dir))
    return wall


def main(argv: list[str] | None = None) -> int:
    from embtune.cli import describe_sections
    from embtune.schema import SECTIONS

    parser = argparse.ArgumentParser(prog="python -m embtune.pipeline", description=__doc__,
                                     epilog="Config keys (override any with section.key=value):"
                                     + describe_sections(list(SECTIONS)),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML recipe (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2")
    parser.add_argument("--launch", default="", help='launcher for the train stage, e.g. "accelerate launch"')
    parser.add_argument("--stages", default=",".join(STAGE_ORDER), help="comma-separated subset to run, in order")
    parser.add_argument("--force", action="store_true", help="rerun every selected stage")
    args, cfg = parse_config_args(parser, argv)
    if cfg is None:
        return 2
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    unknown = set(stages) - set(STAGE_ORDER)
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGE_ORDER)}")
    try:
        code = exit_code(lambda: run(cfg, args.config, args.overrides, launch=args.launch, force=args.force,
                                     stages=stages), debug=args.debug)
    except StageFailed as err:
        print(str(err), file=sys.stderr)
        return err.returncode
    if code == 0:
        print(next_steps(cfg, stages))
    return code


def next_steps(cfg, stages: tuple[str, ...]) -> str:
    """The last lines a run prints: where its report is and how to serve what it exported."""
    run_dir = Path(cfg.run_dir)
    lines = ["", f"report: {run_dir / 'report' / 'index.html'}"]
    manifest = run_dir / "export" / "manifest.json"
    if "export" in stages and manifest.is_file():
        bundle = json.loads(manifest.read_text())["outputs"]["bundle"]
        lines.append(f"serve:  python -m embtune.serve up --bundle {bundle} serve.port=8000")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
