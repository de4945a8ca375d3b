"""Fusion of retriever runs (pytrec_eval format, ``{query id: {doc id: score}}``): one copy for eval, mining and serve.

- ``rrf_fuse``: reciprocal rank fusion (Cormack et al. 2009), ``score(d) = sum_r 1 / (k + rank_r(d))`` with
  1-based ranks over each run's top ``depth``; a document missing from a run adds nothing for it.
- ``weighted_fuse``: ``w * dense + (1 - w) * sparse`` of per-query min-max normalized scores over each run's top
  ``depth``; a document missing from a run gets 0 (that run's minimum) for it.

sentence-transformers and faiss have no run-level fusion; these are the few lines that are missing.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]


def ranked(docs: dict[str, float], depth: int | None = None) -> list[str]:
    """Doc ids by score desc, then id desc (pytrec_eval's tie order), cut at ``depth``."""
    order = sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)
    return [doc_id for doc_id, _ in order[:depth]]


def rrf_fuse(runs: list[Run], k: int = 60, depth: int = 100) -> Run:
    """Reciprocal rank fusion of several runs over the union of their queries."""
    fused: Run = {}
    for qid in sorted({q for run in runs for q in run}):
        scores: dict[str, float] = {}
        for run in runs:
            for rank, doc_id in enumerate(ranked(run.get(qid, {}), depth), start=1):
                scores[doc_id] = scores.get(doc_id, 0.0) + 1.0 / (k + rank)
        fused[qid] = scores
    return fused


def _minmax(docs: dict[str, float], depth: int) -> dict[str, float]:
    top = ranked(docs, depth)
    if not top:
        return {}
    values = np.array([docs[d] for d in top])
    low, span = values.min(), values.max() - values.min()
    # One score (or all equal): every document is as good as the best, so 1.0.
    return {d: (docs[d] - low) / span if span > 0 else 1.0 for d in top}


def weighted_fuse(dense: Run, sparse: Run, dense_weight: float = 0.5, depth: int = 100) -> Run:
    """Convex combination of min-max normalized dense and sparse scores."""
    fused: Run = {}
    for qid in sorted(set(dense) | set(sparse)):
        a, b = _minmax(dense.get(qid, {}), depth), _minmax(sparse.get(qid, {}), depth)
        fused[qid] = {d: dense_weight * a.get(d, 0.0) + (1.0 - dense_weight) * b.get(d, 0.0) for d in set(a) | set(b)}
    return fused


def fuse(method: str, dense: Run, sparse: Run, rrf_k: int = 60, dense_weight: float = 0.5, depth: int = 100) -> Run:
    if method == "rrf":
        return rrf_fuse([dense, sparse], k=rrf_k, depth=depth)
    if method == "weighted":
        return weighted_fuse(dense, sparse, dense_weight=dense_weight, depth=depth)
    raise ValueError(f"unknown fusion method {method!r}; expected 'rrf' or 'weighted'")
