"""Label-free SciFact benchmark: the embedded SmolLM2 writes claims for a seeded sample of corpus passages; no SciFact
query is trained on. Settings are chosen on dev (SciFact *train* queries, which this recipe never trains on), then
the chosen one and the round-trip ablation are evaluated on test.

    # 1. dev: every variant, evaluated on half of the labelled train queries (seeded); test is never read
    python scripts/bench_scifact_labelfree.py --phase dev
    # 2. test: the variant best on dev, plus the ablation without the round-trip filter
    python scripts/bench_scifact_labelfree.py --phase final

All runs share one LLM answer cache (``<run-root>/llm_cache.jsonl``): the round trip, mining and training do not
change the prompts, so the LLM is asked once per passage, and an interrupted run resumes where it stopped.

Writes ``benchmarks/results/scifact_labelfree_dev.json`` and ``benchmarks/results/scifact_labelfree.json``: the
schema of ``scifact_supervised.json`` (``results.{base,bm25,finetuned}`` in percent, per-dim figures,
``wall_seconds``, ``command``, ``machine``, ``versions``) plus ``synthesis: {documents, queries_generated,
queries_kept, tokens, wall_seconds}`` and ``ablations``.
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
from embtune.config import to_dict  # noqa: E402
from embtune.manifest import machine, versions  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
from benchlib import bench_command, percent, run_recipe  # noqa: E402  (scripts/benchlib.py)

# Dotted overrides on configs/scifact_labelfree.yaml; "round_trip_bm25" is the config as shipped.
VARIANTS = {
    "round_trip_bm25": [],
    "no_round_trip": ["llm.round_trip=none"],
    "round_trip_either": ["llm.round_trip=either"],
}


def synthesis_summary(report: dict, llm_wall: float) -> dict:
    synthesis = report["synthesis"]
    return {"documents": synthesis["documents"], "queries_generated": synthesis["cleaning"]["lines"],
            "queries_after_cleaning": synthesis["cleaning"]["kept"], "queries_kept": synthesis["queries"],
            "tokens": {"prompt": synthesis["answers"]["prompt_tokens"],
                       "completion": synthesis["answers"]["completion_tokens"]},
            "wall_seconds": round(llm_wall, 1), "cleaning": synthesis["cleaning"],
            "round_trip": synthesis["round_trip"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["dev", "final"], required=True)
    parser.add_argument("--config", default=str(ROOT / "configs" / "scifact_labelfree.yaml"))
    parser.add_argument("--run-root", default=str(ROOT / "runs" / "bench_labelfree"))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="dev: which VARIANTS to try")
    parser.add_argument("--choice", default="", help="final: the variant to report (default: best on dev)")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides applied to every run")
    args = parser.parse_args()
    setup_logging()
    command = bench_command(sys.argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.time()
    cache = f"llm.cache_file={Path(args.run_root).resolve() / 'llm_cache.jsonl'}"
    llm_wall = 0.0  # the LLM's time is spent by whichever run asks first; the others read the cache

    if args.phase == "dev":
        out = {"command": command, "machine": machine(), "versions": versions(), "split": "dev",
               "dev": "SciFact qrels/train.tsv, half its queries (data.dev_fraction=0.5, seeded); never trained on",
               "variants": {}}
        for name in args.variants.split(","):
            overrides = [f"run_dir={args.run_root}/dev_{name}", cache, "eval.split=dev", "eval.compare_bm25=false",
                         "train.report_to=none", *VARIANTS[name], *args.overrides]
            _, results, report, wall = run_recipe(args.config, overrides)
            llm_wall = max(llm_wall, report["synthesis"]["llm"]["wall_s"])
            out["variants"][name] = {"overrides": VARIANTS[name],
                                     "results": {k: percent(v) for k, v in results["results"].items()},
                                     "num_queries": results["num_queries"], "training_rows": report["rows"],
                                     "synthesis": synthesis_summary(report, llm_wall), "wall_seconds": wall}
            print(f"dev {name}: finetuned nDCG@10 = {100 * results['results']['finetuned']['ndcg@10']:.2f} "
                  f"(base {100 * results['results']['base']['ndcg@10']:.2f})", flush=True)
        out["best"] = max(out["variants"], key=lambda n: out["variants"][n]["results"]["finetuned"]["ndcg@10"])
        out["wall_seconds_total"] = round(time.time() - start, 1)
        (RESULTS / "scifact_labelfree_dev.json").write_text(json.dumps(out, indent=2))
        print(f"best on dev: {out['best']}")
        return 0

    choice = args.choice or json.loads((RESULTS / "scifact_labelfree_dev.json").read_text())["best"]
    runs = {}
    for name in dict.fromkeys([choice, "no_round_trip" if choice != "no_round_trip" else "round_trip_bm25"]):
        overrides = [f"run_dir={args.run_root}/test_{name}", cache, "eval.split=test", *VARIANTS[name], *args.overrides]
        cfg, results, report, wall = run_recipe(args.config, overrides)
        llm_wall = max(llm_wall, report["synthesis"]["llm"]["wall_s"])
        runs[name] = (cfg, overrides, results, report, wall)
    cfg, overrides, results, report, wall = runs[choice]
    res = results["results"]
    out = {
        "benchmark": "scifact_labelfree",
        "description": "all-MiniLM-L6-v2 fine-tuned on claims the embedded SmolLM2-135M-Instruct wrote for a seeded "
                       "sample of SciFact corpus passages (no SciFact query trained on; settings chosen on SciFact "
                       "train queries as dev), evaluated on qrels/test.tsv; metrics in percent",
        "dataset": "BEIR SciFact (../shared/data/beir/scifact)",
        "split": "test",
        "num_queries": results["num_queries"],
        "num_documents": results["num_documents"],
        "choice": choice,
        "overrides": overrides,
        "config": to_dict(cfg),
        "results": {"base": percent(res["base"]), "bm25": percent(res["bm25"]), "finetuned": percent(res["finetuned"])},
        "synthesis": synthesis_summary(report, llm_wall),
        "ablations": {name: {"overrides": VARIANTS[name], "finetuned": percent(r[2]["results"]["finetuned"]),
                             "training_rows": r[3]["rows"], "queries_kept": r[3]["synthesis"]["queries"]}
                      for name, r in runs.items()},
        "published": {"all-MiniLM-L6-v2 (MTEB)": 64.51, "BM25 (BEIR)": 66.5, "GPL best": 68.9},
        "training_rows": report["rows"],
        "mining_report": report["mining"],
        "wall_seconds": {**wall, "total": round(time.time() - start, 1)},
        "command": command,
        "machine": machine(),
        "versions": versions(),
    }
    (RESULTS / "scifact_labelfree.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({"results": out["results"], "ablations": out["ablations"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
