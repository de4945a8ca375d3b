"""Measure a finished label-free run on judged queries it never saw (shared by bench_scifact_labelfree.py and
bench_labelfree_corpora.py): the pipeline decided without labels; this reads them afterwards.

Rows: base, bm25, base + BM25 and (when a student was trained) student and student + BM25, the fusions at the
weight the run chose, and ``shipped``: the spec in the bundle's ``retriever.json``, searched through the core
``Retriever`` exactly as eval and serve search (queries by role, one per batch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from embtune.dataio import document_text, load_corpus, load_qrels, load_queries
from embtune.eval import score
from embtune.eval.run import evaluate_dense
from embtune.retrieval.spec import BM25Index, FusionSpec, Retriever, RetrieverSpec


def ndcg10(qrels, run, cfg) -> float:
    """nDCG@10 (percent, 2 decimals) of ``run`` through the eval path, with eval's identical-id rule."""
    return round(100 * score(qrels, run, ignore_identical_ids=cfg.eval.ignore_identical_ids).metrics["ndcg@10"], 2)


def measure_run(cfg, run_dir: Path, judged_folder: Path, split: str) -> dict[str, Any]:
    """nDCG@10 (percent) of every row on ``judged_folder``'s ``qrels/<split>.tsv``; and the shipped spec's row."""
    corpus = load_corpus(judged_folder / "corpus.jsonl", "raise")
    queries = load_queries(judged_folder / "queries.jsonl", "raise")
    qrels = load_qrels(judged_folder / "qrels" / f"{split}.tsv", corpus, queries, "raise")
    query_ids = sorted(qrels)
    query_texts = [queries[q] for q in query_ids]
    doc_ids = list(corpus)
    doc_texts = [document_text(corpus[d]) for d in doc_ids]
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    recommended = results["recommended"]
    models = results["models"]
    bm25 = BM25Index(doc_texts, cfg.bm25)
    weight = recommended["dense_weight"]
    out: dict[str, Any] = {}
    bm25_spec = RetrieverSpec(dense=None, bm25=cfg.bm25)
    measured = {}
    for name, path in models.items():
        row = evaluate_dense(name, path, doc_ids, doc_texts, query_ids, query_texts, qrels, cfg, bm25=bm25)
        measured[name] = row
        out[name] = round(100 * row["metrics"]["ndcg@10"], 2)
        model_weight = weight.get(name, cfg.eval.hybrid_weight) if isinstance(weight, dict) else weight
        fused = row["spec"].replace(bm25=cfg.bm25, fusion=FusionSpec(method="weighted", dense_weight=model_weight,
                                                                      rrf_k=cfg.eval.rrf_k,
                                                                      depth=cfg.eval.hybrid_depth))
        run_ = row["retriever"].search(query_texts, row["query_emb"], cfg.eval.top_k, query_ids, spec=fused)
        out[f"{name}+bm25_weighted"] = ndcg10(qrels, run_, cfg)
    bm25_retriever = Retriever(bm25_spec, doc_ids, doc_texts, bm25=bm25)
    out["bm25"] = ndcg10(qrels, bm25_retriever.search(query_texts, None, cfg.eval.top_k, query_ids), cfg)
    spec = RetrieverSpec.from_dict(recommended["spec"])
    bundle_spec = RetrieverSpec.load(run_dir / "bundle" / "retriever.json") if (
        run_dir / "bundle" / "retriever.json").is_file() else None
    if spec.dense is None:
        shipped = out["bm25"]
    else:
        owner = next(name for name, path in models.items() if path == spec.dense.model)
        row = measured[owner]
        run_ = row["retriever"].search(query_texts, row["query_emb"], cfg.eval.top_k, query_ids, spec=spec)
        shipped = ndcg10(qrels, run_, cfg)
    return {"rows": out, "shipped": {"row": recommended["row"], "ndcg@10": shipped,
                                     "chosen_by": recommended["chosen_by"], "why": recommended["why"],
                                     "evidence": recommended.get("evidence", {}),
                                     "lexical_check": recommended.get("lexical_check"),
                                     "bundle_retriever": bundle_spec.to_dict() if bundle_spec else None},
            "num_queries": len(query_ids), "num_documents": len(doc_ids), "dense_weight": weight}
