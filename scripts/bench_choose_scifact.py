"""Choosing a base model on SciFact: python -m embtune.eval.choose on a dev split of the TRAIN queries, never test.

    python scripts/bench_choose_scifact.py [--candidates minilm run:runs/* ...] [--dev-fraction 0.2]

Runs ``eval.choose`` with configs/scifact_supervised.yaml (data at ../shared/data/beir/scifact) and
``data.dev_fraction`` carved from qrels/train.tsv (the seeded split data_prep uses), and writes the ranking with
machine, versions and the exact command to benchmarks/results/choose_scifact.json. Corpus embeddings come from the
shared cache when present (the timing sample is always encoded uncached).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from benchlib import ROOT, bench_command, write_result

from embtune.cli import setup_logging
from embtune.eval.choose import choose
from embtune.manifest import Provenance
from embtune.schema import load_config

CONFIG = "configs/scifact_supervised.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", nargs="+", default=["minilm", "run:runs/*"])
    parser.add_argument("--dev-fraction", type=float, default=0.2)
    parser.add_argument("--hybrid", default="rrf,weighted")
    parser.add_argument("--run-dir", default="runs/choose_scifact")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "choose_scifact.json"))
    args = parser.parse_args()
    provenance = Provenance.start(bench_command(sys.argv))
    setup_logging()

    overrides = [f"run_dir={args.run_dir}", f"data.dev_fraction={args.dev_fraction}",
                 f"eval.choose.hybrid=[{args.hybrid}]"]
    cfg = load_config(ROOT / CONFIG, overrides)
    result = choose(cfg, args.candidates, Path(args.run_dir) / "eval" / "choose.json")
    record = {
        "benchmark": "choose_scifact",
        "date": datetime.date.today().isoformat(),
        **provenance.record(),
        "equivalent": (f"python -m embtune.eval.choose {CONFIG} {' '.join(overrides)} "
                       f"--candidates {' '.join(args.candidates)}"),
        "description": "eval.choose on SciFact: candidate base models, BM25 and hybrids ranked by nDCG@10 on a dev "
                       "split of the train queries (test untouched); paired randomization test of each row against "
                       "the best; encode seconds per 1k documents from an uncached sample on a shared 2-core CPU",
        "candidates": args.candidates,
        **{k: v for k, v in result.items() if k != "per_query"},
    }
    write_result(args.out, record)  # the previous run goes under other_runs
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
