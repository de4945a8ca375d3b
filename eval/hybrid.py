"""BM25 + dense fusion and cross-encoder reranking of pytrec_eval runs (``{query id: {doc id: score}}``).

- ``rrf_fuse``: reciprocal rank fusion (Cormack et al. 2009), ``score(d) = sum_r 1 / (k + rank_r(d))`` with
  1-based ranks over each run's top ``depth``; a document missing from a run adds nothing for it.
- ``weighted_fuse``: ``w * dense + (1 - w) * sparse`` of per-query min-max normalized scores over each run's top
  ``depth``; a document missing from a run gets 0 (that run's minimum) for it.
- ``rerank``: score each query's top ``top_k`` with a ``sentence_transformers.CrossEncoder`` and order them by it.

sentence-transformers and faiss have no run-level fusion; these are the few lines that are missing.
"""

from __future__ import annotations

import logging
from typing import Protocol

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


class PairScorer(Protocol):
    def predict(self, sentences: list[tuple[str, str]], batch_size: int = ..., **kwargs) -> np.ndarray: ...


def rerank(scorer: PairScorer, run: Run, query_texts: dict[str, str], doc_texts: dict[str, str],
           top_k: int = 100, batch_size: int = 32) -> Run:
    """Rescore each query's top ``top_k`` documents with ``scorer.predict([(query, doc), ...])``.

    Documents below ``top_k`` are kept, ranked after the reranked ones in their first-stage order, so that deeper
    metrics (recall@100, map@100) stay comparable with the first stage instead of being cut at ``top_k``.
    """
    qids = sorted(run)
    candidates = {qid: ranked(run[qid]) for qid in qids}
    pairs = [(query_texts[qid], doc_texts[d]) for qid in qids for d in candidates[qid][:top_k]]
    logger.info("reranking %d (query, document) pairs", len(pairs))
    scores = np.asarray(scorer.predict(pairs, batch_size=batch_size, show_progress_bar=len(pairs) > 5000),
                        dtype=np.float64).reshape(-1)  # (n_pairs,)
    out: Run = {}
    offset = 0
    for qid in qids:
        head, tail = candidates[qid][:top_k], candidates[qid][top_k:]
        head_scores = scores[offset: offset + len(head)]
        offset += len(head)
        docs = {d: float(s) for d, s in zip(head, head_scores)}
        floor = float(head_scores.min()) if len(head) else 0.0
        # The tail keeps its first-stage order, strictly below every reranked document.
        docs.update({d: floor - 1.0 - i for i, d in enumerate(tail)})
        out[qid] = docs
    return out
