"""Fusion of retriever runs (pytrec_eval format, ``{query id: {doc id: score}}``): the one formula.

Every hybrid in embtune fuses here: eval's hybrid rows, eval.choose and serve (through
``embtune.retrieval.spec.Retriever``), the label-free teacher and its probe (``data_prep.labelfree.FusedTeacher``),
mining's hybrid candidates (``data_prep.mining.fuse``) and the distillation teacher (``data_prep.teacher``).

- ``weighted_fuse``: ``w * dense + (1 - w) * sparse`` of per-query normalized scores; the candidates are the union
  of each run's top ``depth``. ``normalization`` says how each run's scores are put on one scale:

  - ``corpus_zscore`` (the default): ``(score - mean) / std`` with the mean and standard deviation of the query's
    scores over the whole corpus (:class:`ScoreStats`, from the full score vector: a matrix-vector product for
    dense, one sparse row for BM25; ``Retriever`` computes them and its member runs carry them, :class:`MemberRun`);
  - ``corpus_minmax``: ``(score - min) / (max - min)`` over the whole corpus;
  - ``topk_zscore`` / ``topk_minmax``: the same over the run's own top ``depth`` (no statistics needed;
    ``topk_minmax`` was embtune's formula before the comparison).

  A candidate missing from one run gets that run's score when the run holds it beyond ``depth``, else the lowest
  normalized score of the run's top ``depth`` (its true score is at most that).

  The default is the best of the four on dev queries carved from the train split (SciFact and the pydoc corpus,
  base MiniLM + the ``bm25`` section's BM25, the dense weight chosen on dev for each; missing candidates at the
  run's lowest scored better than at their exact score): ``benchmarks/results/fusion.json``,
  ``scripts/bench_fusion.py``. A whole-corpus normalization without statistics is an error, never a fallback.
- ``rrf_fuse``: reciprocal rank fusion (Cormack et al. 2009), ``score(d) = sum_r w_r / (k + rank_r(d))`` with
  1-based ranks over each run's top ``depth``; a document missing from a run adds nothing for it.

sentence-transformers and faiss have no run-level fusion; these are the few lines that are missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]

NORMALIZATIONS = ("corpus_zscore", "corpus_minmax", "topk_zscore", "topk_minmax")
DEFAULT_NORMALIZATION = "corpus_zscore"  # chosen on dev: benchmarks/results/fusion.json


@dataclass(frozen=True)
class ScoreStats:
    """One query's scores over the whole corpus under one retriever: what a whole-corpus normalization reads."""

    low: float
    high: float
    mean: float
    std: float

    @classmethod
    def of(cls, scores: np.ndarray) -> "ScoreStats":
        """Statistics of a full (n_docs,) score vector (float64 sums, so the order of addition hardly matters)."""
        scores = np.asarray(scores, dtype=np.float64)
        if scores.size == 0:
            return cls(0.0, 0.0, 0.0, 0.0)
        return cls(float(scores.min()), float(scores.max()), float(scores.mean()), float(scores.std()))


Stats = dict[str, ScoreStats]  # query id -> statistics of that query's full score vector


class MemberRun(dict):
    """A member's run (``{query id: {doc id: score}}``) that carries each query's whole-corpus ``stats``: what the
    core's searches (``Retriever``, the label-free teacher) return, so ``weighted_fuse(dense, sparse, w, depth)``
    normalizes over the corpus without more arguments. A plain dict copy drops the statistics."""

    def __init__(self, run: Run | None = None, stats: Stats | None = None) -> None:
        super().__init__(run or {})
        self.stats: Stats = dict(stats or {})


def needs_stats(normalization: str) -> bool:
    """Whether ``normalization`` reads whole-corpus statistics (:class:`ScoreStats`)."""
    _check(normalization)
    return normalization.startswith("corpus_")


def _check(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown fusion normalization {normalization!r}; expected one of {list(NORMALIZATIONS)}")


def ranked(docs: dict[str, float], depth: int | None = None) -> list[str]:
    """Doc ids by score desc, then id desc (pytrec_eval's tie order), cut at ``depth``."""
    order = sorted(docs.items(), key=lambda item: (item[1], item[0]), reverse=True)
    return [doc_id for doc_id, _ in order[:depth]]


def rrf_fuse(runs: list[Run], k: int = 60, depth: int = 100, weights: list[float] | None = None) -> Run:
    """Reciprocal rank fusion of several runs over the union of their queries; ``weights`` (one per run, default
    all 1) multiply each run's ``1 / (k + rank)``."""
    weights = [1.0] * len(runs) if weights is None else weights
    if len(weights) != len(runs):
        raise ValueError(f"rrf_fuse: {len(weights)} weights for {len(runs)} runs")
    fused: Run = {}
    for qid in sorted({q for run in runs for q in run}):
        scores: dict[str, float] = {}
        for run, weight in zip(runs, weights):
            for rank, doc_id in enumerate(ranked(run.get(qid, {}), depth), start=1):
                scores[doc_id] = scores.get(doc_id, 0.0) + weight / (k + rank)
        fused[qid] = scores
    return fused


def _scale(docs: dict[str, float], top: list[str], normalization: str,
           stats: ScoreStats | None) -> tuple[float, float]:
    """(shift, span) such that a score ``s`` normalizes to ``(s - shift) / span``; span 0 means "all equal"."""
    if normalization.startswith("corpus_"):
        if normalization == "corpus_minmax":
            return stats.low, stats.high - stats.low
        return stats.mean, stats.std
    values = np.array([docs[d] for d in top], dtype=np.float64)
    if normalization == "topk_minmax":
        return float(values.min()), float(values.max() - values.min())
    return float(values.mean()), float(values.std())


def normalize(docs: dict[str, float], depth: int, normalization: str = DEFAULT_NORMALIZATION,
              stats: ScoreStats | None = None) -> tuple[dict[str, float], list[str], float]:
    """One query's run normalized: (normalized score of every document in ``docs``, its top ``depth``, the
    normalized score a document missing from ``docs`` gets: the lowest of the top ``depth``)."""
    top = ranked(docs, depth)
    if not top:
        return {}, [], 0.0
    shift, span = _scale(docs, top, normalization, stats)
    if span > 0:
        out = {d: (s - shift) / span for d, s in docs.items()}
    else:
        # One score (or all equal): min-max makes every document as good as the best (1.0); a z-score puts
        # them all at the mean (0.0).
        out = {d: 1.0 if normalization.endswith("minmax") else 0.0 for d in docs}
    return out, top, min(out[d] for d in top)


def weighted_fuse(dense: Run, sparse: Run, dense_weight: float = 0.5, depth: int = 100,
                  normalization: str = DEFAULT_NORMALIZATION, stats: dict[str, Stats] | None = None) -> Run:
    """Convex combination of normalized dense and sparse scores over the union of each run's top ``depth``.

    Args:
        dense, sparse: the members' runs, each searched to at least ``depth`` (scores of documents beyond it are
            used only for candidates the other run brought: see the module docstring).
        dense_weight: the dense share ``w``; BM25 gets ``1 - w``.
        depth: candidates taken from each run.
        normalization: one of ``NORMALIZATIONS``.
        stats: ``{"dense": {qid: ScoreStats}, "sparse": {qid: ScoreStats}}``; required by the ``corpus_*``
            normalizations for every query of the runs. Default: the runs' own (:class:`MemberRun`).
    """
    _check(normalization)
    if stats is None and needs_stats(normalization):
        stats = {"dense": getattr(dense, "stats", {}), "sparse": getattr(sparse, "stats", {})}
    fused: Run = {}
    for qid in sorted(set(dense) | set(sparse)):
        members = []
        for name, run in (("dense", dense), ("sparse", sparse)):
            query_stats = None
            if stats is not None and needs_stats(normalization):
                query_stats = stats[name].get(qid)
                if query_stats is None and run.get(qid):
                    raise ValueError(f"fusion normalization {normalization!r} needs the {name} run's whole-corpus "
                                     f"score statistics, missing for query {qid!r}: search through the core "
                                     "(Retriever, or a MemberRun with stats), pass stats=, or use a topk_* "
                                     "normalization")
            members.append(normalize(run.get(qid, {}), depth, normalization, query_stats))
        (a, a_top, a_floor), (b, b_top, b_floor) = members
        fused[qid] = {d: dense_weight * a.get(d, a_floor) + (1.0 - dense_weight) * b.get(d, b_floor)
                      for d in set(a_top) | set(b_top)}
    return fused


def fuse(method: str, dense: Run, sparse: Run, rrf_k: int = 60, dense_weight: float = 0.5, depth: int = 100,
         normalization: str = DEFAULT_NORMALIZATION, stats: dict[str, Stats] | None = None) -> Run:
    """``rrf`` or ``weighted`` fusion of a dense and a sparse run (see the module docstring)."""
    if method == "rrf":
        return rrf_fuse([dense, sparse], k=rrf_k, depth=depth)
    if method == "weighted":
        return weighted_fuse(dense, sparse, dense_weight=dense_weight, depth=depth, normalization=normalization,
                             stats=stats)
    raise ValueError(f"unknown fusion method {method!r}; expected 'rrf' or 'weighted'")
