"""`make demo`, measured: the demo pipeline run fresh, timed, and its eval numbers -> benchmarks/results/demo.json.

    python scripts/bench_demo.py [--cache cold|warm] [--out benchmarks/results/demo.json]

Clears the demo's run directory (``run_dir`` of configs/demo.yaml, so the LLM's answers are not reused either),
then runs ``python -m embtune.pipeline configs/demo.yaml`` in a subprocess, exactly what ``make demo`` runs after
its install, and times it. ``--cache cold`` (default) points ``EMBTUNE_CACHE`` at an empty folder, as on a fresh
clone; ``--cache warm`` keeps the shared embedding cache (the base model's corpus embeddings may then be read, not
computed) and the record says which. The SmolLM2 weights (~/.cache/embtune/smollm2-hf, converted once at install
time) are reused either way.

Records base, fine-tuned, BM25 and hybrid nDCG@10 on the demo's held-out test split, the paired significance of
fine-tuned vs base and vs BM25 (``eval/results.json``), the pipeline's wall seconds, each stage's, and the load
average of the (shared) machine before and after.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import ROOT, bench_command, percent, write_result

from embtune.config import to_dict
from embtune.manifest import Provenance
from embtune.schema import load_config

CONFIG = "configs/demo.yaml"
BARS = {"p_value_finetuned_vs_base": "< 0.01", "finetuned_vs_bm25": "> 0 with p < 0.01", "wall_seconds": "<= 480"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", choices=("cold", "warm"), default="cold", help="embedding cache state")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo.json"))
    args = parser.parse_args()
    provenance = Provenance.start(bench_command(sys.argv))

    cfg = load_config(ROOT / CONFIG)
    run_dir = ROOT / cfg.run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    cache_tmp = None
    if args.cache == "cold":
        cache_tmp = tempfile.mkdtemp(prefix="embtune-cold-cache-")
        env["EMBTUNE_CACHE"] = cache_tmp
    cache_dir = Path(env.get("EMBTUNE_CACHE", Path.home() / ".cache" / "embtune")) / "embeddings"
    cached_files = len(list(cache_dir.glob("*.npy"))) if cache_dir.is_dir() else 0

    command = [sys.executable, "-m", "embtune.pipeline", CONFIG]
    log_path = run_dir.parent / f"{run_dir.name}.bench.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the pipeline and every process it started and reaped (the LLM server included): on a shared
    # machine wall time grows with the other users' load, CPU time much less; / cores = the wall of a quiet machine
    # if the work were perfectly parallel (a lower bound).
    cpu_seconds = (usage.ru_utime - usage_before.ru_utime) + (usage.ru_stime - usage_before.ru_stime)
    if cache_tmp:
        shutil.rmtree(cache_tmp, ignore_errors=True)
    tail = log_path.read_text().splitlines()[-30:]
    print("\n".join(tail))
    if proc.returncode:
        print(f"pipeline failed (exit {proc.returncode}); log: {log_path}", file=sys.stderr)
        return proc.returncode

    results = json.loads((run_dir / "eval" / "results.json").read_text())
    data_report = json.loads((run_dir / "data_prep" / "report.json").read_text())
    train_manifest = json.loads((run_dir / "train" / "manifest.json").read_text())
    stage_wall = {s: json.loads((run_dir / s / "manifest.json").read_text())["wall_seconds"]
                  for s in ("data_prep", "train", "eval", "export")}
    rows = results["results"]
    significance = results["significance"]
    synthesis = data_report.get("synthesis", {})
    record = {
        "benchmark": "demo",
        "date": datetime.date.today().isoformat(),
        **provenance.record(),
        "pipeline_command": f"python -m embtune.pipeline {CONFIG}   (make demo, after make install)",
        "description": "make demo on the embedded pydoc corpus: train on the train split's summary-line pairs plus "
                       "SmolLM2's synthetic questions; eval on the held-out test split's summary lines",
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(load_after[0], 2)},
        "cache": {"embeddings": args.cache, "embedding_files_before": cached_files,
                  "llm_answers": "none (run dir cleared)",
                  "note": "cold: EMBTUNE_CACHE pointed at an empty folder" if args.cache == "cold" else
                          "warm: the shared embedding cache; corpus embeddings of unchanged models may be read"},
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "stage_wall_seconds": stage_wall,
        "split": results["split"], "num_queries": results["num_queries"], "num_documents": results["num_documents"],
        "data": {"train_queries": data_report["train_queries"],
                 "labelled_train_queries": data_report.get("labelled_train_queries"),
                 "synthetic_queries": synthesis.get("queries"), "rows": data_report["rows"],
                 "llm": synthesis.get("llm")},
        "train": {"steps": max((e.get("step", 0) for e in train_manifest.get("log_history", [])), default=None),
                  "global_batch_size": train_manifest.get("global_batch_size"), "settings": to_dict(cfg.train)},
        "ndcg@10": {name: round(100 * rows[name]["ndcg@10"], 2) for name in rows},
        "results": {name: percent(metrics) for name, metrics in rows.items()},
        "significance": significance.get("finetuned vs base"),
        "significance_all": significance,
        "bars": BARS,
    }
    vs_base, vs_bm25 = significance["finetuned vs base"], significance.get("finetuned vs bm25")
    record["met"] = {"p_value_finetuned_vs_base": vs_base["p_value"] < 0.01 and vs_base["diff"] > 0,
                     "finetuned_vs_bm25": bool(vs_bm25 and vs_bm25["diff"] > 0 and vs_bm25["p_value"] < 0.01),
                     "wall_seconds": wall <= 480}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, record)
    print(f"wall {wall:.0f} s, cpu {cpu_seconds:.0f} s (stages {stage_wall}); nDCG@10 {record['ndcg@10']}; "
          f"finetuned vs base p={vs_base['p_value']:.2g}; met {record['met']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
