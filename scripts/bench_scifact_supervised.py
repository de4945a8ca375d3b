"""Supervised SciFact benchmark: train on qrels/train.tsv only, choose settings on a dev split carved from it,
report test.

    # 1. choose settings on dev (20% of the train queries, seeded); test queries are never read
    python scripts/bench_scifact_supervised.py --phase tune
    # 2. train on the whole train split with the chosen settings, evaluate once on test
    python scripts/bench_scifact_supervised.py --phase final
    # 3. the same training distilled from the fine-tuned model of 2 fused with BM25 (results.distilled)
    python scripts/bench_scifact_supervised.py --phase distilled

Writes ``benchmarks/results/scifact_supervised_dev.json`` (tune) and ``benchmarks/results/scifact_supervised.json``
(final): ``results.{base,bm25,finetuned}`` with ``ndcg@10, mrr@10, recall@100, map@100`` in percent, per-dim
figures, ``wall_seconds`` per stage, ``command``, ``machine`` and ``versions``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embtune.cli import setup_logging  # noqa: E402
from embtune.manifest import Provenance  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
from benchlib import bench_command, percent, run_recipe, test_result, write_result  # noqa: E402  (scripts/benchlib.py)

# The distilled variant (issue 12, item 5): the labelled positives and mined negatives of the chosen settings, plus
# MarginMSE toward a teacher that is the final phase's fine-tuned model fused with BM25 (data_prep.teacher.
# HybridTeacher: cosine + 0.3 x BM25 / the query's best BM25; 0.3 is the weight the dev phase of the label-free
# benchmark chose for the base model, scifact_labelfree_dev.json "teacher_weight"). The teacher's margins are cosine
# differences plus a bounded lexical part, on the student's scale: margin_mse_scale 1.
DISTILLED = ["mining.teacher=hybrid", "mining.teacher_bm25_weight=0.3", "train.loss=mnrl+margin_mse",
             "train.margin_mse_scale=1.0"]

# Candidate settings tried on dev; each is a list of dotted overrides on configs/scifact_supervised.yaml.
GRID = {
    "lr3e-5_ep2_bm25top30": ["train.learning_rate=3e-5", "train.epochs=2", "mining.rank_start=0", "mining.rank_end=30"],
    "lr5e-5_ep2_bm25top30": ["train.learning_rate=5e-5", "train.epochs=2", "mining.rank_start=0", "mining.rank_end=30"],
    "lr3e-5_ep3_bm25_10-50": ["train.learning_rate=3e-5", "train.epochs=3",
                              "mining.rank_start=10", "mining.rank_end=50"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["tune", "final", "distilled"], required=True)
    parser.add_argument("--config", default=str(ROOT / "configs" / "scifact_supervised.yaml"))
    parser.add_argument("--run-root", default=str(ROOT / "runs" / "bench_supervised"))
    parser.add_argument("--candidates", default=",".join(GRID), help="tune: which GRID entries to try")
    parser.add_argument("--choice", default="", help="final: GRID entry to use (default: best on dev)")
    parser.add_argument("--stages", default="data_prep,train,eval,export", help="final: the pipeline stages to run")
    parser.add_argument("--out", default=str(RESULTS / "scifact_supervised.json"),
                        help="final: the result file (distilled adds to scifact_supervised.json)")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides applied to every run")
    args = parser.parse_args()
    setup_logging()
    provenance = Provenance.start(bench_command(sys.argv))
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.time()

    if args.phase == "tune":
        out = {**provenance.record(), "split": "dev",
               "dev_fraction": 0.2, "grid": GRID, "candidates": {}}
        for name in args.candidates.split(","):
            overrides = [f"run_dir={args.run_root}/dev_{name}", "data.dev_fraction=0.2", "eval.split=dev",
                         "eval.compare_bm25=false", "tracking.report_to=none", *GRID[name], *args.overrides]
            _, results, report, wall = run_recipe(args.config, overrides)
            out["candidates"][name] = {"overrides": GRID[name],
                                       "results": {k: percent(v) for k, v in results["results"].items()},
                                       "num_queries": results["num_queries"], "wall_seconds": wall}
            print(f"dev {name}: finetuned nDCG@10 = {100 * results['results']['finetuned']['ndcg@10']:.2f} "
                  f"(base {100 * results['results']['base']['ndcg@10']:.2f})", flush=True)
        best = max(out["candidates"], key=lambda n: out["candidates"][n]["results"]["finetuned"]["ndcg@10"])
        out["best"] = best
        out["wall_seconds_total"] = round(time.time() - start, 1)
        out.update(provenance.record())
        (RESULTS / "scifact_supervised_dev.json").write_text(json.dumps(out, indent=2))
        print(f"best on dev: {best}")
        return 0

    if args.phase == "distilled":
        return distilled(args, provenance, start)

    choice = args.choice
    if not choice:
        dev = json.loads((RESULTS / "scifact_supervised_dev.json").read_text())
        choice = dev["best"]
    # The hybrid rows fuse with a dense share of 0.7 (min-max per query); this share was not tuned on dev.
    overrides = [f"run_dir={args.run_root}/final", "data.dev_fraction=0", "eval.split=test", "eval.hybrid=[weighted]",
                 "eval.hybrid_weight=0.7", *GRID[choice], *args.overrides]
    cfg, results, report, wall = run_recipe(args.config, overrides, stages=tuple(args.stages.split(",")))
    out = test_result("scifact_supervised",
                      "all-MiniLM-L6-v2 fine-tuned on SciFact qrels/train.tsv (settings chosen on a dev split carved "
                      "from train), evaluated on qrels/test.tsv; metrics in percent",
                      choice, cfg, overrides, results, report, wall, start, provenance,
                      published={"all-MiniLM-L6-v2 (MTEB)": 64.51, "BM25 (BEIR)": 66.5, "GPL best": 68.9,
                                 "bge-small-en-v1.5": 71.3})
    write_result(args.out, out)
    print(json.dumps(out["results"], indent=1))
    return 0


def distilled(args, provenance: Provenance, start: float) -> int:
    """Train the final phase's recipe again with the fine-tuned model + BM25 as a MarginMSE teacher; add
    ``results.distilled`` (and its hybrid row) and a paired test against plain MNRL to scifact_supervised.json."""
    from embtune.eval.significance import compare_systems

    path = RESULTS / "scifact_supervised.json"
    final = json.loads(path.read_text())
    final_dir = Path(args.run_root) / "final"
    teacher_model = json.loads((final_dir / "train" / "manifest.json").read_text())["outputs"]["model"]
    overrides = [f"run_dir={args.run_root}/distilled", "data.dev_fraction=0", "eval.split=test",
                 "eval.hybrid=[weighted]", "eval.hybrid_weight=0.7", *GRID[final["choice"]], *DISTILLED,
                 f"mining.model={teacher_model}", *args.overrides]
    _, results, report, wall = run_recipe(args.config, overrides)
    plain = json.loads((final_dir / "eval" / "results.json").read_text())
    res = results["results"]
    final["results"]["distilled"] = percent(res["finetuned"])
    if "finetuned+bm25_weighted" in res:
        final["results"]["distilled+bm25_weighted"] = percent(res["finetuned+bm25_weighted"])
    final["distilled"] = {
        "what": "the final phase's recipe plus MarginMSE toward its own fine-tuned model fused with BM25 "
                "(train.loss mnrl+margin_mse, mining.teacher hybrid)",
        # the plain model trained beside it (the teacher's dense part) on the same machine: results.finetuned may
        # come from another run of the final phase
        "plain_same_machine": {row: percent(plain["results"][row]) for row in ("finetuned", "finetuned+bm25_weighted")
                               if row in plain["results"]},
        "overrides": overrides, "teacher_model": teacher_model,
        "significance": {
            "distilled vs finetuned": compare_systems(plain["per_query"]["finetuned"],
                                                      results["per_query"]["finetuned"], "ndcg@10", 10000, seed=42),
            "distilled vs base": compare_systems(results["per_query"]["base"], results["per_query"]["finetuned"],
                                                 "ndcg@10", 10000, seed=42)},
        "mining_report": report["mining"],
        "wall_seconds": {**wall, "total": round(time.time() - start, 1)},
        **provenance.record()}
    path.write_text(json.dumps(final, indent=2))
    print(json.dumps({k: final["results"][k]["ndcg@10"] for k in ("base", "finetuned", "distilled")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
