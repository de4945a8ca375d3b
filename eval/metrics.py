"""Retrieval metrics computed the way BEIR and MTEB compute them: pytrec_eval over graded qrels.

- ``ndcg@k``: pytrec_eval ``ndcg_cut.k`` (graded gains, log2 discount), averaged over queries;
- ``map@k``: ``map_cut.k``; ``recall@k``: ``recall.k``;
- ``mrr@k``: ``recip_rank`` over each query's top-k (MTEB's MRR@k: 1/rank of the first relevant hit within k).

Like BEIR's ``EvaluateRetrieval.evaluate`` (``ignore_identical_ids=True``), a retrieved document whose id
equals the query id is removed before scoring. Figures are reported as fractions; multiply by 100 for tables.
"""

from __future__ import annotations

import numpy as np
import pytrec_eval


def drop_identical_ids(run: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {qid: {did: s for did, s in docs.items() if did != qid} for qid, docs in run.items()}


def top_k(run: dict[str, dict[str, float]], k: int) -> dict[str, dict[str, float]]:
    """Each query's ``k`` best documents (score desc, then id desc: pytrec_eval's own tie order)."""
    out = {}
    for qid, docs in run.items():
        ranked = sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k]
        out[qid] = dict(ranked)
    return out


def evaluate(
    qrels: dict[str, dict[str, int]],
    run: dict[str, dict[str, float]],
    ndcg_k: tuple[int, ...] = (10,),
    mrr_k: tuple[int, ...] = (10,),
    recall_k: tuple[int, ...] = (10, 100),
    map_k: tuple[int, ...] = (100,),
    ignore_identical_ids: bool = True,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Return (mean metrics, per-query metrics) keyed ``ndcg@10``, ``mrr@10``, ``recall@100``, ``map@100``."""
    if ignore_identical_ids:
        run = drop_identical_ids(run)
    # Queries without any judged document cannot be scored; BEIR evaluates only judged queries.
    run = {qid: docs for qid, docs in run.items() if qid in qrels}
    measures = {f"ndcg_cut.{','.join(map(str, ndcg_k))}", f"recall.{','.join(map(str, recall_k))}",
                f"map_cut.{','.join(map(str, map_k))}"}
    scores = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    per_query: dict[str, dict[str, float]] = {qid: {} for qid in scores}
    for qid, values in scores.items():
        for k in ndcg_k:
            per_query[qid][f"ndcg@{k}"] = values[f"ndcg_cut_{k}"]
        for k in recall_k:
            per_query[qid][f"recall@{k}"] = values[f"recall_{k}"]
        for k in map_k:
            per_query[qid][f"map@{k}"] = values[f"map_cut_{k}"]
    for k in mrr_k:
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top_k(run, k))
        for qid in per_query:
            per_query[qid][f"mrr@{k}"] = rr.get(qid, {}).get("recip_rank", 0.0)
    names = list(next(iter(per_query.values())).keys()) if per_query else []
    mean = {name: float(np.mean([per_query[q][name] for q in per_query])) for name in names}
    return mean, per_query
