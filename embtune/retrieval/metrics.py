"""Retrieval metrics computed the way BEIR and MTEB compute them: pytrec_eval over graded qrels. The one copy:
eval's rows (``embtune.eval.evaluate``), the label-free probe's MRR (``embtune.retrieval.probe``) and every benchmark
script score through :func:`score_run`.

- ``ndcg@k``: pytrec_eval ``ndcg_cut.k`` (graded gains, log2 discount), averaged over queries;
- ``map@k``: ``map_cut.k``; ``recall@k``: ``recall.k``;
- ``mrr@k``: ``recip_rank`` over each query's top-k (MTEB's MRR@k: 1/rank of the first relevant hit within k).

Like BEIR's ``EvaluateRetrieval.evaluate`` (``ignore_identical_ids=True``), a retrieved document whose id
equals the query id is removed before scoring. Figures are reported as fractions; multiply by 100 for tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytrec_eval

# What eval reports for every row (results.json, table.txt, the export's model card, the report), in table order.
METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100", "map@100")

Qrels = dict[str, dict[str, int]]
Run = dict[str, dict[str, float]]

# metric family -> pytrec_eval measure and the key of its per-query value; mrr is computed on each query's top k.
_MEASURES = {"ndcg": ("ndcg_cut", "ndcg_cut_{k}"), "recall": ("recall", "recall_{k}"),
             "map": ("map_cut", "map_cut_{k}")}
_FAMILIES = ("ndcg", "recall", "map", "mrr")  # the order keys come out in (the order results.json has always had)


def drop_identical_ids(run: Run) -> Run:
    return {qid: {did: s for did, s in docs.items() if did != qid} for qid, docs in run.items()}


def top_k(run: Run, k: int) -> Run:
    """Each query's ``k`` best documents (score desc, then id desc: pytrec_eval's own tie order)."""
    out = {}
    for qid, docs in run.items():
        ranked = sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k]
        out[qid] = dict(ranked)
    return out


def parse_metric(name: str) -> tuple[str, int]:
    """``"ndcg@10"`` -> ``("ndcg", 10)``; an unknown family or a cutoff that is not a positive integer is an error."""
    family, _, cutoff = name.partition("@")
    if family not in _FAMILIES or not cutoff.isdigit() or int(cutoff) < 1:
        raise ValueError(f"unknown metric {name!r}: expected <family>@<k> with family one of {list(_FAMILIES)}, "
                         "e.g. 'ndcg@10'")
    return family, int(cutoff)


def score_run(qrels: Qrels, run: Run, metrics: Sequence[str] = METRICS, ignore_identical_ids: bool = True
              ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(mean metrics, per-query metrics) of ``run`` against ``qrels``, keyed by metric name (``"ndcg@10"``).

    Only judged queries that the run answers are scored (BEIR's rule); the mean is over them.
    """
    by_family: dict[str, list[int]] = {family: [] for family in _FAMILIES}
    for name in metrics:
        family, k = parse_metric(name)
        if k not in by_family[family]:
            by_family[family].append(k)
    if ignore_identical_ids:
        run = drop_identical_ids(run)
    # Queries without any judged document cannot be scored; BEIR evaluates only judged queries.
    run = {qid: docs for qid, docs in run.items() if qid in qrels}
    measures = {f"{_MEASURES[f][0]}.{','.join(map(str, ks))}" for f, ks in by_family.items() if ks and f != "mrr"}
    per_query: dict[str, dict[str, float]] = {}
    if measures:
        scores = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
        per_query = {qid: {} for qid in scores}
        for qid, values in scores.items():
            for family in ("ndcg", "recall", "map"):
                for k in by_family[family]:
                    per_query[qid][f"{family}@{k}"] = values[_MEASURES[family][1].format(k=k)]
    for k in by_family["mrr"]:
        rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top_k(run, k))
        if not measures:  # mrr alone: the queries pytrec_eval scores are those the run answers
            per_query = {qid: {} for qid in rr} if not per_query else per_query
        for qid in per_query:
            per_query[qid][f"mrr@{k}"] = rr.get(qid, {}).get("recip_rank", 0.0)
    names = list(next(iter(per_query.values())).keys()) if per_query else []
    mean = {name: float(np.mean([per_query[q][name] for q in per_query])) for name in names}
    return mean, per_query
