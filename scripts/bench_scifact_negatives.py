"""SciFact supervised: which negatives, and does a cross-encoder teacher help? A grid over
{random, bm25, dense, hybrid} negatives x {mnrl, mnrl+margin_mse}, nDCG@10 on test per cell.

    # the full grid (GPU: minutes; a shared 2-core CPU: many hours)
    python scripts/bench_scifact_negatives.py
    # a subset, with CPU-sized settings (any extra dotted overrides apply to every cell)
    python scripts/bench_scifact_negatives.py --cells hybrid:mnrl,hybrid:mnrl+margin_mse train.max_seq_length=128
    # choose settings on a dev split carved from train (test never read): add --split dev
    # only the mining stage per method (guard drop counts, candidates per query): add --mining-only
    # the MarginMSE column with the label-free hybrid teacher instead of a trained cross-encoder (nothing trained)
    python scripts/bench_scifact_negatives.py --teacher hybrid --cells bm25:mnrl+margin_mse
    # only the cross-encoder teacher's rerank nDCG@10 (trains it first unless its manifest is up to date)
    python scripts/bench_scifact_negatives.py --cells ""

Steps (each skips itself when its stage manifests match, so an interrupted run resumes):
1. teacher: data_prep + ``python -m embtune.train.cross_encoder`` with configs/scifact_teacher.yaml (embtune-trained
   cross-encoder from MiniLM's weights, on the train split only);
2. cells: data_prep (mining.method, mining.teacher) -> train (train.loss) -> eval, per cell;
3. teacher rerank: the base model's top-``--rerank-depth`` on the evaluation split, reranked by the teacher.

Results are merged into ``benchmarks/results/scifact_negatives.json`` (``--split test``) or
``scifact_negatives_dev.json`` after every step: ``cells.<method>:<loss>`` with nDCG@10 (percent), the mining
report (guard drop counts, candidates per query, teacher audit), rows and wall seconds; ``teacher`` with its
settings and rerank nDCG@10; ``command``, ``machine``, ``versions``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embtune.cli import setup_logging  # noqa: E402
from embtune.config import to_dict  # noqa: E402
from embtune.manifest import Provenance  # noqa: E402
from embtune.schema import load_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
from benchlib import base_row, bench_command  # noqa: E402  (scripts/benchlib.py)

METHODS = ("random", "bm25", "dense", "hybrid")
LOSSES = ("mnrl", "mnrl+margin_mse")


def pct(x: float) -> float:
    return round(100 * x, 2)


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save(path: Path, out: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)


def train_teacher(args, split_overrides: list[str]) -> tuple[str, dict]:
    from embtune.data_prep.run import run as data_prep_run
    from embtune.train.cross_encoder import run as ce_run

    overrides = [f"run_dir={args.run_root}/teacher", *split_overrides, *args.teacher_overrides]
    cfg = load_config(str(ROOT / "configs" / "scifact_teacher.yaml"), overrides)
    start = time.time()
    data_prep_run(cfg)
    outputs = ce_run(cfg)
    manifest = json.loads((Path(cfg.run_dir) / "cross_encoder" / "manifest.json").read_text())
    info = {"config": to_dict(cfg.cross_encoder), "mining": to_dict(cfg.mining), "overrides": overrides,
            "trained_by": ("embtune (python -m embtune.train.cross_encoder), from all-MiniLM-L6-v2's BERT weights + "
                           "new head"),
            "train_steps": max((row.get("step", 0) for row in manifest.get("log_history", [])), default=0),
            "wall_seconds": round(time.time() - start, 1)}
    return outputs["model"], info


def teacher_rerank(args, teacher_path: str, split_overrides: list[str]) -> dict:
    """The base model's top-k on the evaluation split, reranked by the teacher (and the base ranking, for reference)."""
    from embtune.data_prep.run import run as data_prep_run
    from embtune.dataio import document_text, load_corpus, load_qrels, load_queries
    from embtune.eval import score
    from embtune.eval.run import eval_inputs
    from embtune.retrieval.rerank import CrossEncoderScorer, rerank

    cfg = load_config(args.config, [f"run_dir={args.run_root}/rerank", *split_overrides, *args.overrides,
                                    "mining.method=none"])
    data_prep_run(cfg)  # for the dev split's qrels; mining is off
    inputs = eval_inputs(cfg)
    corpus = load_corpus(inputs["corpus"])
    queries = load_queries(inputs["queries"])
    qrels = load_qrels(inputs["qrels"], corpus, queries)
    doc_ids, query_ids = list(corpus), sorted(qrels)
    doc_texts = [document_text(corpus[d]) for d in doc_ids]
    start = time.time()
    base = base_row(cfg.train.base_model, doc_ids, doc_texts, {q: queries[q] for q in query_ids}, qrels,
                    args.rerank_depth, cfg.eval.max_seq_length, cfg.eval.batch_size)
    if teacher_path == "hybrid":
        from embtune.data_prep.teacher import HybridTeacher

        scorer = HybridTeacher(doc_texts, cfg.train.base_model, cfg.bm25, args.teacher_weight,
                               max_seq_length=cfg.mining.max_seq_length)
    else:
        scorer = CrossEncoderScorer(teacher_path, max_length=cfg.mining.teacher_max_length)
    reranked = rerank(scorer, base.run, queries, dict(zip(doc_ids, doc_texts)), args.rerank_depth)
    base_mean, rerank_mean = base.metrics, score(qrels, reranked).metrics
    return {"depth": args.rerank_depth, "num_queries": len(query_ids),
            "base_ndcg@10": pct(base_mean["ndcg@10"]), "teacher_rerank_ndcg@10": pct(rerank_mean["ndcg@10"]),
            "teacher_max_length": cfg.mining.teacher_max_length, "wall_seconds": round(time.time() - start, 1)}


def run_cell(args, method: str, loss: str, teacher_path: str, split_overrides: list[str]) -> dict:
    from embtune.pipeline import run as run_pipeline

    name = f"{method}:{loss}"
    overrides = [f"run_dir={args.run_root}/{method}_{loss.replace('+', '_')}", f"mining.method={method}",
                 f"train.loss={loss}", *split_overrides, *args.overrides]
    if teacher_path and (loss != "mnrl" or args.audit_all):
        overrides.append(f"mining.teacher={teacher_path}")
        if teacher_path == "hybrid":  # cosine-scale scores: no logit rescaling
            overrides += [f"mining.teacher_bm25_weight={args.teacher_weight}", "train.margin_mse_scale=1"]
    cfg = load_config(args.config, overrides)
    wall = run_pipeline(cfg, args.config, overrides, stages=("data_prep", "train", "eval"))
    results = json.loads((Path(cfg.run_dir) / "eval" / "results.json").read_text())
    mining = json.loads((Path(cfg.run_dir) / "data_prep" / "report.json").read_text())
    res = results["results"]
    cell = {"finetuned_ndcg@10": pct(res["finetuned"]["ndcg@10"]), "base_ndcg@10": pct(res["base"]["ndcg@10"]),
            "finetuned": {k: pct(v) for k, v in res["finetuned"].items() if k != "dims" and k != "dim"},
            "overrides": overrides, "rows": mining["rows"], "mining_report": mining["mining"], "wall_seconds": wall}
    if "bm25" in res:
        cell["bm25_ndcg@10"] = pct(res["bm25"]["ndcg@10"])
    print(f"{name}: nDCG@10 {cell['finetuned_ndcg@10']} (base {cell['base_ndcg@10']})", flush=True)
    return cell


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "scifact_negatives.yaml"))
    parser.add_argument("--run-root", default=str(ROOT / "runs" / "bench_negatives"))
    parser.add_argument("--cells", default=",".join(f"{m}:{loss}" for m in METHODS for loss in LOSSES),
                        help="comma-separated method:loss cells, in the order to run them")
    parser.add_argument("--split", choices=["test", "dev"], default="test",
                        help="dev: carve 20%% of the train queries (seeded) and evaluate on them; test is never read")
    parser.add_argument("--rerank-depth", type=int, default=20)
    parser.add_argument("--skip-rerank", action="store_true")
    parser.add_argument("--mining-only", action="store_true",
                        help="run data_prep only, per method of --cells, and record the mining reports")
    parser.add_argument("--audit-all", action="store_true", help="set mining.teacher in MNRL cells too (for the audit)")
    parser.add_argument("--teacher", choices=["cross_encoder", "hybrid"], default="cross_encoder",
                        help="cross_encoder: train one with configs/scifact_teacher.yaml; hybrid: the label-free "
                             "teacher (base cosine + --teacher-weight x per-query-normalized BM25), nothing trained")
    parser.add_argument("--teacher-weight", type=float, default=0.3,
                        help="hybrid teacher's BM25 weight (0.3: best rerank nDCG@10 on a dev half of SciFact train, "
                             "benchmarks/results/scifact_labelfree_dev.json)")
    parser.add_argument("--teacher-overrides", default="", help="space-separated overrides for the teacher recipe")
    parser.add_argument("--note", default="",
                        help="free text stored with this invocation's command (e.g. why a subset)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every cell")
    args = parser.parse_args()
    args.teacher_overrides = shlex.split(args.teacher_overrides)
    setup_logging()
    provenance = Provenance.start(bench_command(sys.argv))
    command = provenance.command
    split_overrides = ["data.dev_fraction=0.2", "eval.split=dev"] if args.split == "dev" else ["eval.split=test"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / ("scifact_negatives.json" if args.split == "test" else "scifact_negatives_dev.json")
    out = load_results(path)
    out.update({"benchmark": "scifact_negatives", "split": args.split,
                "description": "all-MiniLM-L6-v2 fine-tuned on SciFact qrels/train.tsv with negatives mined by each "
                               "method, with MNRL or MNRL + MarginMSE from an embtune-trained cross-encoder teacher; "
                               "nDCG@10 in percent on the evaluation split",
                **provenance.record()})  # taken again at the end; a killed run keeps the start's
    out.setdefault("cells", {})
    out.setdefault("commands", [])
    out["commands"].append({"command": command, "note": args.note} if args.note else command)

    cells = [tuple(c.split(":", 1)) for c in args.cells.split(",") if c]
    if args.mining_only:
        from embtune.data_prep.run import run as data_prep_run

        out.setdefault("mining_reports", {})
        for method in dict.fromkeys(m for m, _ in cells):
            overrides = [f"run_dir={args.run_root}/mining_{method}", f"mining.method={method}", *split_overrides,
                         *args.overrides]
            start = time.time()
            outputs = data_prep_run(load_config(args.config, overrides))
            report = json.loads(Path(outputs["report"]).read_text())
            out["mining_reports"][method] = {"overrides": overrides, "rows": report["rows"],
                                             "mining_report": report["mining"],
                                             "wall_seconds": round(time.time() - start, 1)}
            save(path, out)
        return 0
    needs_teacher = any(loss != "mnrl" for _, loss in cells) or args.audit_all or not args.skip_rerank
    teacher_path = ""
    teacher_key = "teacher" if args.teacher == "cross_encoder" else "hybrid_teacher"
    if needs_teacher and args.teacher == "hybrid":
        teacher_path = "hybrid"
        out[teacher_key] = {"kind": "data_prep.teacher.HybridTeacher (label-free)", "bm25_weight": args.teacher_weight,
                            "formula": "cosine(all-MiniLM-L6-v2) + bm25_weight * BM25 / the query's top BM25 score"}
    elif needs_teacher:
        teacher_path, out[teacher_key] = train_teacher(args, split_overrides)
        save(path, out)
    for method, loss in cells:
        name = f"{method}:{loss}" + ("" if loss == "mnrl" or args.teacher == "cross_encoder" else " (hybrid teacher)")
        out["cells"][name] = run_cell(args, method, loss, teacher_path, split_overrides)
        save(path, out)
    if teacher_path and not args.skip_rerank:
        out[teacher_key]["rerank"] = teacher_rerank(args, teacher_path, split_overrides)
        print(f"teacher rerank: {out[teacher_key]['rerank']}", flush=True)
        save(path, out)
    done = {k: v["finetuned_ndcg@10"] for k, v in out["cells"].items()}
    out["best"] = max(done, key=done.get) if done else None
    out.update(provenance.record())
    save(path, out)
    print(json.dumps(done, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
