"""Hard-negative mining: rank the corpus for each training query, guard against false negatives, pick negatives.

    retrieve (BM25 | dense | hybrid = both fused) -> rank window -> guards -> sample (top | random)
    -> fill or drop queries left short -> teacher scores (optional) -> rows + report

Guards, in the order they apply to each candidate in the window (each drop is counted under its name):

- ``empty_document``: a document with no text is never a negative;
- ``positive``: a judged positive (or a document ``exclude`` names, e.g. a positive's sibling chunk);
- ``duplicate_of_positive``: the same normalized text as a positive (a duplicate passage under another id);
- ``duplicate_negative``: the same normalized text as a negative already kept for the query;
- ``max_score``: retriever score above ``Guards.max_score``;
- ``margin``: retriever score >= (lowest positive score) - |that score| * ``Guards.margin`` (:func:`margin_floor`);
- ``teacher_max_score`` / ``teacher_margin``: the same, with the cross-encoder teacher's logits (additive margin).

Guard scores are the retriever's own: BM25 scores for BM25, cosine for dense, and cosine for hybrid too (an RRF
score is rank-based and a fused score mixes two scales at a chosen weight, so neither is a relevance scale a
positive's score can be compared on). With several positives, a candidate is compared with the lowest-scoring one.

``mine_negatives`` runs the phases in order over a :class:`MiningCorpus` and each query's :class:`QueryPositives`
(computed once): :func:`window_candidates`, :func:`teacher_guards`, :func:`sample_rows`, then the teacher's score
columns and the audit. Its settings are the mining section (``embtune.sections.data_prep.MiningConfig``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from embtune.retrieval.bm25 import BM25Tokenizer, FastBM25, rank_order, top_k_rank_bm25
from embtune.retrieval.fusion import DEFAULT_NORMALIZATION, ScoreStats, needs_stats, rrf_fuse, weighted_fuse

logger = logging.getLogger(__name__)

_TOKEN = re.compile(r"\w+", re.UNICODE)


def simple_tokenize(text: str) -> list[str]:
    """Lowercased word tokens: the default BM25 tokenization (``BM25Tokenizer(token_pattern=r"\\w+")``)."""
    return _TOKEN.findall(text.lower())


def normalized_hash(text: str) -> str:
    """Hash of text with case, punctuation and whitespace removed: equal hashes mean the same passage."""
    return hashlib.sha1(" ".join(simple_tokenize(text)).encode()).hexdigest()


def bm25_rankings(doc_texts: list[str], query_texts: list[str], depth: int) -> np.ndarray:
    """Top-``depth`` document indices per query under rank-bm25's BM25Okapi (the reference implementation).

    Ties are broken by document index (``fast_bm25.rank_order``), so the ranking is deterministic and equal to
    ``FastBM25.search`` with the same tokens.
    """
    from rank_bm25 import BM25Okapi

    bm25 = BM25Okapi([simple_tokenize(t) for t in doc_texts])
    _, indices = top_k_rank_bm25(bm25, [simple_tokenize(q) for q in query_texts], depth)
    return indices


@dataclass
class Ranking:
    """Candidates per query from a retriever (or a fusion of two), with the scores the guards compare.

    ``indices``/``scores`` are (n_queries, depth), best first (index -1 = no document, e.g. a short IVF list);
    ``score_docs(query_row, doc_indices)`` gives the guard score of any document, e.g. of a positive that the
    retriever did not rank.
    """

    indices: np.ndarray
    scores: np.ndarray
    score_docs: Callable[[int, np.ndarray], np.ndarray]
    score_name: str
    num_docs: int = 0  # the corpus size (0 = unknown): a whole-corpus fusion normalization scores every document


def bm25_ranking(doc_texts: list[str], query_texts: list[str], depth: int, backend: str = "fast",
                 tokenizer: BM25Tokenizer | None = None, k1: float = 1.5, b: float = 0.75) -> Ranking:
    """BM25Okapi candidates: ``fast`` (FastBM25, exact) or ``rank_bm25`` (the reference, a Python loop per query)."""
    tokenizer = tokenizer or BM25Tokenizer(token_pattern=r"\w+")
    query_tokens = list(tokenizer.tokenize_many(query_texts))
    if backend == "fast":
        index = FastBM25(tokenizer.tokenize_many(doc_texts), k1=k1, b=b)
        scores, indices = index.search(query_tokens, k=depth)
        weights = index.weights  # (vocab, docs) CSR with sorted column indices per term

        def score_docs(row: int, docs: np.ndarray) -> np.ndarray:
            # Sum of each query term's weight in each document (rank-bm25's get_batch_scores, without a full row).
            out = np.zeros(len(docs))
            for token in query_tokens[row]:
                term = index.vocab.get(token)
                if term is None:
                    continue
                lo, hi = weights.indptr[term], weights.indptr[term + 1]
                cols = weights.indices[lo:hi]
                pos = np.searchsorted(cols, docs)
                hit = (pos < len(cols)) & (cols[np.minimum(pos, len(cols) - 1)] == docs)
                out[hit] += weights.data[lo:hi][pos[hit]]
            return out
    elif backend == "rank_bm25":
        from rank_bm25 import BM25Okapi

        bm25 = BM25Okapi(list(tokenizer.tokenize_many(doc_texts)), k1=k1, b=b)
        scores, indices = top_k_rank_bm25(bm25, query_tokens, depth)

        def score_docs(row: int, docs: np.ndarray) -> np.ndarray:
            return np.asarray(bm25.get_batch_scores(query_tokens[row], [int(d) for d in docs]), dtype=np.float64)
    else:
        raise ValueError(f"mining.bm25_backend must be 'fast' or 'rank_bm25', got {backend!r}")
    return Ranking(indices, scores, score_docs, "bm25", len(doc_texts))


def encode_for_mining(model_name: str, doc_texts: list[str], query_texts: list[str], batch_size: int = 64,
                      max_seq_length: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(doc embeddings (n_docs, dim), query embeddings (n_queries, dim)), float32, normalized for cosine models.

    Document embeddings come from the shared cache (``embtune.retrieval.encoder``), so mining and evaluating the
    same base model encode the corpus once.
    """
    from embtune.compute.encoding import encode
    from embtune.retrieval.encoder import load_encoder

    model, key = load_encoder(model_name, max_seq_length)
    if getattr(model, "similarity_fn_name", "cosine") not in (None, "cosine"):
        logger.warning("mining model %s scores by %s; guard scores are its raw similarities, not cosine",
                       model_name, model.similarity_fn_name)
    doc_emb = encode(model, doc_texts, batch_size, cache_key=key, desc="mining corpus")  # (n_docs, dim)
    query_emb = encode(model, query_texts, batch_size, cache_key=key, desc="mining query")  # (n_queries, dim)
    return doc_emb, query_emb


def dense_ranking(doc_emb: np.ndarray, query_emb: np.ndarray, depth: int, index: str = "flat", nlist: int = 0,
                  nprobe: int = 16) -> Ranking:
    """Dense candidates from FAISS (``embtune.retrieval.index.search``); guard score = inner product (cosine if
    normalized)."""
    from embtune.retrieval.index import search

    scores, indices = search(doc_emb, query_emb, depth, index=index, nlist=nlist, nprobe=nprobe)

    def score_docs(row: int, docs: np.ndarray) -> np.ndarray:
        return (doc_emb[docs] @ query_emb[row]).astype(np.float64)  # (len(docs),)

    return Ranking(indices, scores, score_docs, "cosine", len(doc_emb))


def fuse(bm25: Ranking, dense: Ranking, depth: int, fusion: str = "rrf", rrf_k: int = 60,
         bm25_weight: float = 0.5, dense_weight: float = 0.5,
         stats: dict[str, list[ScoreStats]] | None = None) -> Ranking:
    """Hybrid candidates: both lists fused by the retrieval core's formula; guard scores are the dense ones.

    - ``rrf``: ``embtune.retrieval.fusion.rrf_fuse`` with weights ``bm25_weight`` and ``dense_weight``;
    - ``weighted``: ``embtune.retrieval.fusion.weighted_fuse`` with dense share
      ``dense_weight / (dense_weight + bm25_weight)`` and the core's default normalization over each retriever's
      whole-corpus scores (``Ranking.score_docs`` of every document), as the ``Retriever`` eval and serve run.
    Ties are broken by document index. The corpus size is ``num_docs`` of the rankings (else the largest index
    seen + 1). ``stats`` (``{"sparse": [...], "dense": [...]}``, one :class:`ScoreStats` per query): the
    whole-corpus statistics already computed (on shards), instead of scoring every document here.
    """
    if fusion not in ("rrf", "weighted"):
        raise ValueError(f"mining.fusion must be 'rrf' or 'weighted', got {fusion!r}")
    n_queries = bm25.indices.shape[0]
    width = max(bm25.indices.shape[1], dense.indices.shape[1])
    num_docs = max(bm25.num_docs, dense.num_docs) or int(max(bm25.indices.max(), dense.indices.max())) + 1
    all_docs = np.arange(num_docs) if stats is None else None  # scored one query at a time when no stats are given
    out_indices = np.full((n_queries, depth), -1, dtype=np.int64)
    out_scores = np.full((n_queries, depth), -np.inf)
    for row in range(n_queries):
        # One query as pytrec_eval runs keyed by document index, the core fusion's input.
        lists = {name: [int(d) for d in r.indices[row] if d >= 0] for name, r in (("sparse", bm25), ("dense", dense))}
        runs = {name: {str(d): float(s) for d, s in zip(lists[name], r.scores[row])}
                for name, r in (("sparse", bm25), ("dense", dense))}
        if fusion == "rrf":
            fused = rrf_fuse([{"q": runs["sparse"]}, {"q": runs["dense"]}], k=rrf_k, depth=width,
                             weights=[bm25_weight, dense_weight])["q"]
        else:
            query_stats = None
            if needs_stats(DEFAULT_NORMALIZATION) and stats is not None:
                query_stats = {name: {"q": stats[name][row]} for name in ("sparse", "dense")}
            elif needs_stats(DEFAULT_NORMALIZATION):
                query_stats = {name: {"q": ScoreStats.of(ranking.score_docs(row, all_docs))}  # (num_docs,) scores
                               for name, ranking in (("sparse", bm25), ("dense", dense))}
            weight = dense_weight / (dense_weight + bm25_weight)
            fused = weighted_fuse({"q": runs["dense"]}, {"q": runs["sparse"]}, weight, width, stats=query_stats)["q"]
        union = np.array([int(d) for d in fused], dtype=np.int64)
        scores = np.array([fused[str(d)] for d in union])
        top = rank_order(scores, union, depth)
        out_indices[row, :len(top)] = union[top]
        out_scores[row, :len(top)] = dense.score_docs(row, union[top])
    return Ranking(out_indices, out_scores, dense.score_docs, f"cosine ({fusion} fusion order)", num_docs)


@dataclass
class Guards:
    """False-negative guards beyond the always-on ones (None = off); see the module docstring."""

    margin: float | None = None
    max_score: float | None = None
    teacher_margin: float | None = None
    teacher_max_score: float | None = None

    @property
    def uses_teacher(self) -> bool:
        return self.teacher_margin is not None or self.teacher_max_score is not None


@dataclass
class MiningReport:
    queries: int = 0
    pairs: int = 0
    candidates: int = 0
    dropped: Counter = field(default_factory=Counter)
    filled_random: int = 0
    short_queries: int = 0
    dropped_queries: int = 0
    empty_documents: int = 0
    duplicate_documents: int = 0
    score_name: str = ""
    per_query: list[dict[str, Any]] = field(default_factory=list)
    audit: dict[str, Any] | None = None

    def candidate_stats(self) -> dict[str, float]:
        """Summary over queries of how many window candidates passed the guards."""
        passed = np.array([q["passed"] for q in self.per_query] or [0])
        return {"min": int(passed.min()), "p10": float(np.percentile(passed, 10)),
                "median": float(np.median(passed)), "mean": round(float(passed.mean()), 2), "max": int(passed.max())}

    def to_dict(self, per_query: bool = False) -> dict[str, Any]:
        out = {
            "queries": self.queries,
            "pairs": self.pairs,
            "candidates": self.candidates,
            "dropped": dict(self.dropped),
            "pairs_filled_with_random": self.filled_random,
            "queries_short_of_negatives": self.short_queries,
            "queries_dropped": self.dropped_queries,
            "empty_documents": self.empty_documents,
            "duplicate_documents": self.duplicate_documents,
            "guard_score": self.score_name,
            "candidates_passing_guards": self.candidate_stats(),
            "audit": self.audit,
        }
        if per_query:
            out["per_query"] = self.per_query
        return out

    def table(self) -> str:
        """A small on-screen summary."""
        stats = self.candidate_stats()
        lines = [f"mining: {self.queries} queries, {self.pairs} rows, {self.candidates} window candidates "
                 f"(guard score: {self.score_name or 'n/a'})",
                 f"  {'guard':<24}{'dropped':>10}"]
        lines += [f"  {name:<24}{count:>10}" for name, count in sorted(self.dropped.items())]
        lines.append(f"  candidates passing guards per query: min {stats['min']}, median {stats['median']:g}, "
                     f"mean {stats['mean']:g}, max {stats['max']}")
        lines.append(f"  short queries: {self.short_queries} (filled with {self.filled_random} random negatives, "
                     f"{self.dropped_queries} queries dropped); empty documents: {self.empty_documents}; "
                     f"duplicate documents: {self.duplicate_documents}")
        if self.audit:
            a = self.audit
            lines.append(f"  teacher audit: {a['sampled']} kept negatives, {a['at_or_above_positive']} score >= their "
                         f"positive -> estimated false-negative rate {100 * a['estimated_false_negative_rate']:.1f}%")
        return "\n".join(lines)


def _random_negatives(
    count: int, doc_ids: list[str], doc_hashes: list[str], positive_ids: set[str], positive_hashes: set[str],
    taken: set[int], rng: random.Random, empty: set[int] | None = None,
) -> list[int]:
    """Up to ``count`` random document indices that pass the same guards (rejection sampling, bounded tries)."""
    out: list[int] = []
    taken_hashes = {doc_hashes[i] for i in taken}
    for _ in range(count * 50):
        if len(out) == count:
            break
        index = rng.randrange(len(doc_ids))
        if (index in taken or doc_ids[index] in positive_ids or doc_hashes[index] in positive_hashes
                or doc_hashes[index] in taken_hashes or (empty and index in empty)):
            continue
        taken.add(index)
        taken_hashes.add(doc_hashes[index])
        out.append(index)
    return out


@dataclass
class MiningCorpus:
    """The corpus as mining reads it, computed once: ids and texts in row order, normalized-text hashes, the rows
    of empty documents."""

    doc_ids: list[str]
    texts: list[str]
    hashes: list[str]
    empty: set[int]
    row_of: dict[str, int]

    @classmethod
    def of(cls, corpus: dict[str, dict[str, str]], doc_texts: dict[str, str]) -> "MiningCorpus":
        doc_ids = list(corpus)
        texts = [doc_texts[d] for d in doc_ids]
        empty = {i for i, t in enumerate(texts) if not t.strip()}
        return cls(doc_ids, texts, [normalized_hash(t) for t in texts], empty, {d: i for i, d in enumerate(doc_ids)})

    def duplicates(self) -> int:
        """Non-empty documents whose normalized text another document already has."""
        distinct = {h for i, h in enumerate(self.hashes) if i not in self.empty}
        return len(self.hashes) - len(self.empty) - len(distinct)


@dataclass
class QueryPositives:
    """A query's judged positives (in qrels order), the ids that must never be its negatives (positives and
    ``exclude``), and the positives' normalized-text hashes: computed once per query, read by every phase."""

    ids: list[str]
    excluded: set[str]
    hashes: set[str]


def query_positives(qrels: dict[str, dict[str, int]], query_ids: list[str], doc_texts: dict[str, str],
                    exclude: dict[str, set[str]] | None) -> list[QueryPositives]:
    out = []
    for query_id in query_ids:
        positives = [d for d, r in qrels[query_id].items() if r > 0]
        out.append(QueryPositives(positives, set(positives) | (exclude or {}).get(query_id, set()),
                                  {normalized_hash(doc_texts[d]) for d in positives}))
    return out


def guards_of(config) -> Guards:
    """The guards a mining section (``embtune.sections.data_prep.MiningConfig``) turns on."""
    return Guards(margin=config.margin, max_score=config.max_score, teacher_margin=config.teacher_margin,
                  teacher_max_score=config.teacher_max_score)


def mine_negatives(
    corpus: dict[str, dict[str, str]],
    queries: dict[str, str],
    qrels: dict[str, dict[str, int]],
    doc_texts: dict[str, str],
    config=None,
    *,
    ranking: Ranking | None = None,
    teacher=None,
    exclude: dict[str, set[str]] | None = None,
    guards: Guards | None = None,
    tokenizer: BM25Tokenizer | None = None,
    bm25_backend: str = "fast",
    seed: int = 42,
    **settings: Any,
) -> tuple[list[dict[str, Any]], MiningReport]:
    """One row per (query, positive) with ``num_negatives`` mined negatives.

    Returns rows with keys ``query_id, query, positive_id, positive, negative_i, negative_i_id`` (plus
    ``score_positive, score_negative_i`` with a ``teacher``, a ``embtune.retrieval.rerank.CrossEncoderScorer``) and a
    report.

    Args:
        config: the mining section (``embtune.sections.data_prep.MiningConfig``: ``method``, ``num_negatives``,
            ``rank_start``, ``rank_end``, ``sampling``, ``on_short``, the guard thresholds, ``audit_size``,
            ``audit_threshold``); default the section's defaults. ``settings`` replace some of its fields
            (``mine_negatives(..., num_negatives=4, rank_end=30)``).
        ranking: the candidates for the judged queries in qrels order (``candidate_query_ids``); for
            ``method="bm25"`` without one, BM25 is run here (``bm25_backend``, ``tokenizer``).
        teacher: scores (query, document) pairs: teacher guards, score columns and the audit.
        exclude: further documents per query that must never be negatives.
        guards: the guards to apply; default the ones ``config`` turns on.

    Queries whose window runs short are filled with random guarded documents (``on_short="random"``, counted) or
    dropped (``"drop"``, counted). The phases: window candidates through the retriever-score guards
    (:func:`window_candidates`), the teacher guards (:func:`teacher_guards`), sampling into rows
    (:func:`sample_rows`), then teacher scores and the audit.
    """
    from embtune.sections.data_prep import MiningConfig

    config = config or MiningConfig()
    if settings:
        config = dataclasses.replace(config, **settings)
    guards = guards or guards_of(config)
    if guards.uses_teacher and teacher is None:
        raise ValueError("teacher guards (mining.teacher_margin / teacher_max_score) need mining.teacher")
    rng = random.Random(seed)
    docs = MiningCorpus.of(corpus, doc_texts)
    query_ids = candidate_query_ids(qrels)
    positives = query_positives(qrels, query_ids, doc_texts, exclude)
    report = MiningReport(queries=len(query_ids), empty_documents=len(docs.empty),
                          duplicate_documents=docs.duplicates())
    if docs.empty:
        logger.warning("mining: %d empty documents are never negatives", len(docs.empty))

    if ranking is None and config.method == "bm25" and config.num_negatives > 0:
        ranking = bm25_ranking(docs.texts, [queries[q] for q in query_ids], config.rank_end, bm25_backend, tokenizer)
    if ranking is not None:
        report.score_name = ranking.score_name

    passed, window_sizes = window_candidates(docs, positives, ranking, config, guards, report)
    if guards.uses_teacher:
        passed = teacher_guards(docs, queries, query_ids, positives, passed, teacher, guards, report, doc_texts)
    rows = sample_rows(docs, queries, query_ids, positives, passed, window_sizes, ranking is not None, config, rng,
                       report, doc_texts)
    report.pairs = len(rows)

    if teacher is not None and rows:
        add_teacher_scores(rows, teacher, config.num_negatives)
        report.audit = audit(rows, config.num_negatives, config.audit_size, config.audit_threshold, seed,
                             teacher_guard=guards.uses_teacher)
    return rows, report


def window_candidates(docs: MiningCorpus, positives: list[QueryPositives], ranking: Ranking | None, config,
                      guards: Guards, report: MiningReport) -> tuple[list[list[int]], list[int]]:
    """Phase 1: each query's rank window ``[rank_start, rank_end)`` through the always-on and retriever-score
    guards, each drop counted in ``report``. Returns (passing document rows per query, window size per query)."""
    passed_per_query: list[list[int]] = []
    window_sizes: list[int] = []
    for qi, positive in enumerate(positives):
        passed: list[int] = []
        window = []
        if ranking is not None and config.num_negatives > 0:
            window = [int(i) for i in ranking.indices[qi][config.rank_start:config.rank_end] if i >= 0]
        window_sizes.append(len(window))
        if window:
            scores = ranking.scores[qi][config.rank_start:config.rank_start + len(window)]
            positive_score = None
            if guards.margin is not None:
                positive_score = float(ranking.score_docs(qi, np.array([docs.row_of[d] for d in positive.ids])).min())
            kept_hashes: set[str] = set()
            for index, score in zip(window, scores):
                report.candidates += 1
                if index in docs.empty:
                    report.dropped["empty_document"] += 1
                elif docs.doc_ids[index] in positive.excluded:
                    report.dropped["positive"] += 1
                elif docs.hashes[index] in positive.hashes:
                    report.dropped["duplicate_of_positive"] += 1
                elif docs.hashes[index] in kept_hashes:
                    report.dropped["duplicate_negative"] += 1
                elif guards.max_score is not None and score > guards.max_score:
                    report.dropped["max_score"] += 1
                elif positive_score is not None and score >= margin_floor(positive_score, guards.margin):
                    report.dropped["margin"] += 1
                else:
                    kept_hashes.add(docs.hashes[index])
                    passed.append(index)
        passed_per_query.append(passed)
    return passed_per_query, window_sizes


def margin_floor(positive_score: float, margin: float) -> float:
    """The score from which a candidate counts as too close to the positive: ``margin`` of the positive's magnitude
    below it. ``positive * (1 - margin)`` is that for a positive score only; for a negative one (a dot-product
    model) it lies above the positive and would keep the candidates that outscore it."""
    return positive_score - abs(positive_score) * margin


def teacher_guards(docs: MiningCorpus, queries: dict[str, str], query_ids: list[str],
                   positives: list[QueryPositives], passed_per_query: list[list[int]], teacher, guards: Guards,
                   report: MiningReport, doc_texts: dict[str, str]) -> list[list[int]]:
    """Phase 2: one batched teacher pass over every surviving candidate and every positive; drops candidates
    above ``teacher_max_score`` or within ``teacher_margin`` of the query's lowest-scoring positive."""
    pairs = []
    for qi, query_id in enumerate(query_ids):
        pairs += [(queries[query_id], doc_texts[d]) for d in positives[qi].ids]
        pairs += [(queries[query_id], docs.texts[i]) for i in passed_per_query[qi]]
    scores = iter(teacher.score(pairs))
    out = []
    for qi in range(len(query_ids)):
        positive_score = min(next(scores) for _ in positives[qi].ids)
        kept = []
        for index in passed_per_query[qi]:
            score = next(scores)
            if guards.teacher_max_score is not None and score > guards.teacher_max_score:
                report.dropped["teacher_max_score"] += 1
            elif guards.teacher_margin is not None and score > positive_score - guards.teacher_margin:
                report.dropped["teacher_margin"] += 1
            else:
                kept.append(index)
        out.append(kept)
    return out


def sample_rows(docs: MiningCorpus, queries: dict[str, str], query_ids: list[str],
                positives: list[QueryPositives], passed_per_query: list[list[int]], window_sizes: list[int],
                retrieved: bool, config, rng: random.Random, report: MiningReport,
                doc_texts: dict[str, str]) -> list[dict[str, Any]]:
    """Phase 3: pick ``num_negatives`` per query (``sampling`` top or random), fill a short query with random
    guarded documents or drop it (``on_short``), and build one row per (query, positive)."""
    rows = []
    for qi, query_id in enumerate(query_ids):
        positive = positives[qi]
        passed = passed_per_query[qi]
        if config.sampling == "random":
            chosen = rng.sample(passed, min(config.num_negatives, len(passed)))
        else:
            chosen = passed[:config.num_negatives]
        entry = {"query_id": query_id, "window": window_sizes[qi], "passed": len(passed), "chosen": len(chosen),
                 "random_fill": 0, "dropped": False}
        if len(chosen) < config.num_negatives:
            if retrieved:
                report.short_queries += 1
            if config.on_short == "random" or not retrieved:
                extra = _random_negatives(config.num_negatives - len(chosen), docs.doc_ids, docs.hashes,
                                          positive.excluded, positive.hashes, set(chosen), rng, docs.empty)
                if retrieved:
                    report.filled_random += len(extra)
                    entry["random_fill"] = len(extra)
                chosen += extra
        if len(chosen) < config.num_negatives:
            report.dropped_queries += 1
            report.dropped["query_without_enough_negatives"] += 1
            entry["dropped"] = True
            report.per_query.append(entry)
            continue
        report.per_query.append(entry)
        for positive_id in positive.ids:
            row = {"query_id": query_id, "query": queries[query_id],
                   "positive_id": positive_id, "positive": doc_texts[positive_id]}
            for n, index in enumerate(chosen, start=1):
                row[f"negative_{n}"] = docs.texts[index]
                row[f"negative_{n}_id"] = docs.doc_ids[index]
            rows.append(row)
    return rows


def candidate_query_ids(qrels: dict[str, dict[str, int]]) -> list[str]:
    """The queries that get rows (those with a positive judgement), in qrels order: the rows of a ``Ranking``."""
    return [q for q in qrels if any(r > 0 for r in qrels[q].values())]


def add_teacher_scores(rows: list[dict[str, Any]], teacher, num_negatives: int) -> None:
    """Add ``score_positive`` and ``score_negative_1..k`` (teacher logits) to each row, in one batched pass."""
    pairs = []
    for row in rows:
        pairs.append((row["query"], row["positive"]))
        pairs += [(row["query"], row[f"negative_{n}"]) for n in range(1, num_negatives + 1)]
    scores = teacher.score(pairs).reshape(len(rows), num_negatives + 1)  # (rows, 1 + k)
    for row, row_scores in zip(rows, scores):
        row["score_positive"] = float(row_scores[0])
        for n in range(1, num_negatives + 1):
            row[f"score_negative_{n}"] = float(row_scores[n])


def audit(rows: list[dict[str, Any]], num_negatives: int, size: int, threshold: float | None, seed: int,
          teacher_guard: bool) -> dict[str, Any]:
    """Estimate the false-negative rate of the kept negatives: a seeded sample of (row, negative), each compared
    with its row's positive under the teacher. A negative the teacher scores >= the positive is counted as a likely
    false negative (an unjudged relevant document)."""
    everything = [(r, n) for r in range(len(rows)) for n in range(1, num_negatives + 1)]
    sample = random.Random(seed).sample(everything, min(size, len(everything)))
    above_positive = sum(rows[r][f"score_negative_{n}"] >= rows[r]["score_positive"] for r, n in sample)
    out = {"sampled": len(sample), "at_or_above_positive": int(above_positive),
           "estimated_false_negative_rate": round(above_positive / len(sample), 4) if sample else 0.0,
           "threshold": threshold, "teacher_guard_applied": teacher_guard}
    if threshold is not None:
        out["at_or_above_threshold"] = int(sum(rows[r][f"score_negative_{n}"] >= threshold for r, n in sample))
    if teacher_guard:
        out["note"] = "teacher guards were on, so kept negatives already pass the teacher margin/ceiling"
    return out
