"""Deployment sweep on SciFact test for the base and the fine-tuned model, with significance and hybrid rows.

    python scripts/bench_deploy_sweep.py --finetuned runs/bench_supervised/final/train/model

Runs the eval stage (``eval/run.py``) on ``qrels/test.tsv`` with ``eval.sweep.enabled=true``,
``eval.hybrid=[rrf, weighted]`` and the default significance test, then writes
``benchmarks/results/deploy_sweep_scifact.json`` (sweep rows per model, eval table in percent, significance of
finetuned vs base and vs BM25, the 1/8-bytes bar check, ``command``, ``machine``, ``versions``) and
``benchmarks/results/deploy_sweep_scifact.png``. Corpus embeddings are cached on disk
(``embtune/retrieval/encoder.py``), so a rerun only re-searches.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import write_result  # noqa: E402  (scripts/benchlib.py)

from embtune.cli import setup_logging  # noqa: E402
from embtune.config import to_dict  # noqa: E402
from embtune.eval import METRICS  # noqa: E402
from embtune.eval.run import run as run_eval  # noqa: E402
from embtune.eval.sweep import best_compact, label  # noqa: E402
from embtune.manifest import Provenance  # noqa: E402
from embtune.schema import load_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BAR_FRACTION, BAR_KEEP = 1 / 8, 0.97


def training_record(model: Path) -> dict:
    """What the fine-tuned model was trained on, from its train (and data_prep) manifests when they exist."""
    record: dict = {}
    train_manifest = model.parent / "manifest.json"
    if train_manifest.is_file():
        manifest = json.loads(train_manifest.read_text())
        record.update(train_config=manifest.get("config"), train_fingerprint=manifest.get("fingerprint"))
    report = model.parent.parent / "data_prep" / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        record.update({k: data[k] for k in ("train_queries", "dev_queries", "rows") if k in data})
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetuned", required=True, help="fine-tuned sentence-transformers folder")
    parser.add_argument("--base", default="minilm", help="base model (alias, folder or hub name)")
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "beir"
                                              / "scifact"), help="BEIR folder")
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "bench_deploy_sweep"))
    parser.add_argument("--name", default="deploy_sweep_scifact", help="result file stem")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides, e.g. eval.sweep.threads=2")
    args = parser.parse_args()
    setup_logging()
    provenance = Provenance.start()
    overrides = [f"run_dir={args.run_dir}", f"data.path={args.data}", "data.dev_fraction=0", "eval.split=test",
                 f"train.base_model={args.base}", "eval.compare_base=true", "eval.compare_bm25=true",
                 "eval.sweep.enabled=true", "eval.hybrid=[rrf,weighted]", *args.overrides]
    cfg = load_config(ROOT / "configs" / "scifact_supervised.yaml", overrides)
    cfg.eval.extra_models = {"finetuned": str(Path(args.finetuned).resolve())}
    start = time.time()
    outputs = run_eval(cfg, force=True)
    results = json.loads(Path(outputs["results"]).read_text())
    rows = json.loads(Path(outputs["sweep"]).read_text())["rows"]

    bar = {}
    for model in ("base", "finetuned"):
        best = best_compact(rows, model, BAR_FRACTION)
        bar[model] = None if best is None else {
            "configuration": label(best), "dim": best["dim"], "ndcg@10": round(100 * best["ndcg@10"], 2),
            "bytes_per_vector": best["bytes_per_vector"], "bytes_vs_fp32_flat": round(best["bytes_vs_fp32_flat"], 4),
            "ndcg@10_vs_fp32_flat": round(best["ndcg@10_vs_fp32_flat"], 4),
            "meets_bar": best["ndcg@10_vs_fp32_flat"] >= BAR_KEEP}

    RESULTS.mkdir(parents=True, exist_ok=True)
    plot = RESULTS / f"{args.name}.png"
    shutil.copyfile(outputs["sweep_plot"], plot)
    out = {
        "benchmark": args.name,
        "description": "FAISS index x Matryoshka dim x precision sweep on BEIR SciFact test (nDCG@10 against "
                       "qrels; recall@10 against the fp32 Flat top-10 at the same dim); base vs fine-tuned vs "
                       "BM25 significance on per-query nDCG@10; BM25+dense fusion rows",
        "dataset": args.data, "split": "test",
        "num_queries": results["num_queries"], "num_documents": results["num_documents"],
        "models": results["models"],
        "finetuned_training": training_record(Path(args.finetuned)),
        "bar": {"rule": f"some configuration at <= 1/8 of fp32 Flat bytes/vector keeps >= {BAR_KEEP:.0%} of the "
                        "fine-tuned fp32 Flat nDCG@10 (full dim)", **bar},
        "eval_percent": {name: {m: round(100 * v[m], 2) for m in METRICS} for name, v in results["results"].items()},
        "significance": results["significance"],
        "sweep": rows,
        "plot": str(plot.relative_to(ROOT)),
        "config": to_dict(cfg.eval),
        "wall_seconds": {**results["wall_seconds"], "total": round(time.time() - start, 1)},
        **provenance.record(),
    }
    write_result(RESULTS / f"{args.name}.json", out)  # the previous run goes under other_runs
    print(json.dumps({"bar": out["bar"], "eval_percent": out["eval_percent"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
