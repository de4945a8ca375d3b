"""Teachers that score (query, document) pairs for distillation.

A cross-encoder teacher is ``embtune.retrieval.rerank.CrossEncoderScorer`` (scores cached on disk); the label-free
teacher is :class:`HybridTeacher` below: the retrieval core's fusion of the dense model and BM25.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)


HYBRID_TEACHER = "hybrid"


class HybridTeacher:
    """A label-free teacher: the core's fused score (``embtune.retrieval.fusion.weighted_fuse``) of the dense model
    and BM25 (the ``bm25`` section: tokenizer, ``k1``, ``b``), on the dense model's cosine scale.

    For a corpus without labelled queries there is no cross-encoder to distil from, but two retrievers that fail in
    different ways are at hand: the base dense model and BM25. Their fusion beats either alone, so its scores are
    pseudo-labels that carry information the student lacks (GPL distils a cross-encoder the same way). The fusion is
    the one eval measures and serve serves, with dense share ``1 / (1 + bm25_weight)``, over each member's scores of
    every corpus document (so any pair is scored exactly). The fused value of a query's documents is then mapped back
    to the dense model's scale, ``mean + std * fused`` with the mean and standard deviation of the query's cosines
    over the corpus: the order among a query's documents is the fusion's, ``bm25_weight: 0`` gives the cosine itself,
    and a margin is in cosine units, so ``train.margin_mse_scale: 1`` fits.

    Selected with ``mining.teacher: hybrid`` (``mining.teacher_bm25_weight`` sets the weight). Scores are computed,
    not cached: BM25 over the corpus and the corpus embeddings (cached by ``embtune.retrieval.encoder.encode``) are
    cheap.

    Args:
        doc_texts: every corpus document (BM25 statistics are over the whole corpus); pairs must use these texts.
        model_name: the dense model (a folder, hub name or ``embtune.models`` alias).
        bm25: the ``bm25`` section (``embtune.retrieval.bm25.BM25Config``).
        bm25_weight: BM25's weight beside the dense model's 1; 0 = the dense model alone.
    """

    def __init__(self, doc_texts: Sequence[str], model_name: str, bm25, bm25_weight: float = 1.0,
                 batch_size: int = 64, max_seq_length: int = 0) -> None:
        from embtune.retrieval.spec import BM25Index

        self.name_or_path = f"{HYBRID_TEACHER}({model_name} + {bm25_weight} x bm25)"
        self.doc_texts = list(doc_texts)
        self.row_of = {text: row for row, text in enumerate(self.doc_texts)}
        self.index = BM25Index(self.doc_texts, bm25)
        self.bm25_weight = bm25_weight
        self.dense_weight = 1.0 / (1.0 + bm25_weight)
        self.model_name = model_name
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.model_calls = 0
        self._doc_emb = None
        self._model = None

    def _encoder(self):
        if self._model is None:
            from embtune.compute.encoding import encode_corpus
            from embtune.models import resolve_model
            from embtune.retrieval.encoder import cache_key, load_encoder

            self._model, _ = load_encoder(self.model_name, self.max_seq_length)
            key = cache_key(resolve_model(self.model_name), self._model.max_seq_length, role="document")
            # (n_docs, dim) from the shared embedding cache, or on the Ray engine the ShardSet
            self._doc_emb = encode_corpus(self._model, self.doc_texts, self.batch_size, cache_key=key,
                                          role="document", desc="teacher corpus")
        return self._model

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """(n_pairs,) float64 scores; every document must be one of ``doc_texts``."""
        from embtune.retrieval.encoder import encode
        from embtune.retrieval.fusion import DEFAULT_NORMALIZATION, ScoreStats, needs_stats, weighted_fuse

        missing = next((d for _, d in pairs if d not in self.row_of), None)
        if missing is not None:
            raise ValueError(f"the hybrid teacher scores corpus documents only; not in the corpus: {missing[:80]!r}")
        if not pairs:
            return np.zeros(0)
        model = self._encoder()
        queries = list(dict.fromkeys(q for q, _ in pairs))
        query_emb = encode(model, queries, self.batch_size, desc="teacher query", role="query")  # (n_queries, dim)
        rows_of: dict[str, list[int]] = {}
        for query, doc in pairs:
            rows_of.setdefault(query, []).append(self.row_of[doc])
        # Each query's documents as runs over its whole-corpus scores, fused by the core's formula.
        dense: dict[str, dict[str, float]] = {}
        sparse: dict[str, dict[str, float]] = {}
        stats: dict[str, dict[str, ScoreStats]] = {"dense": {}, "sparse": {}}
        sharded = not isinstance(self._doc_emb, np.ndarray)
        if sharded:  # the Ray engine: each query's whole-corpus statistics in one pass over the shards
            from embtune.retrieval.spec import dense_index, row_vectors

            dense_stats = dense_index(self._doc_emb).score_stats(query_emb)
        for i, query in enumerate(queries):
            qid = str(i)
            rows = sorted(set(rows_of[query]))
            if sharded:
                cosine = dict(zip(rows, row_vectors(self._doc_emb, rows) @ query_emb[i]))
                stats["dense"][qid] = dense_stats[i]
            else:
                cosine = self._doc_emb @ query_emb[i]  # (n_docs,)
                stats["dense"][qid] = ScoreStats.of(cosine)
            lexical = self.index.all_scores(query)  # (n_docs,)
            dense[qid] = {str(r): float(cosine[r]) for r in rows}
            sparse[qid] = {str(r): float(lexical[r]) for r in rows}
            stats["sparse"][qid] = ScoreStats.of(lexical)
        depth = max(len(docs) for docs in dense.values())
        if not needs_stats(DEFAULT_NORMALIZATION):  # pairs are any documents, not a run's top: it needs the corpus
            raise ValueError(f"HybridTeacher needs a whole-corpus normalization, not {DEFAULT_NORMALIZATION!r}")
        fused = weighted_fuse(dense, sparse, self.dense_weight, depth, stats=stats)
        query_id = {q: str(i) for i, q in enumerate(queries)}
        out = np.empty(len(pairs))
        for n, (query, doc) in enumerate(pairs):
            qid = query_id[query]
            cos = stats["dense"][qid]
            # Back to the cosine scale: the inverse of the dense member's own normalization.
            shift, span = (cos.mean, cos.std) if DEFAULT_NORMALIZATION == "corpus_zscore" else (cos.low,
                                                                                                 cos.high - cos.low)
            out[n] = shift + span * fused[qid][str(self.row_of[doc])]
        self.model_calls += len(pairs)
        return out


def rescore_candidates(scorer, query_texts: list[str], fused: dict[str, dict[str, float]], doc_text: dict[str, str],
                       depth: int, weight: float = 1.0) -> dict[str, dict[str, float]]:
    """A teacher you bring, on the label-free teacher's candidates: each query's top ``depth`` under ``fused``
    (query ids ``"0".."n-1"``) scored by ``scorer`` (a cross-encoder: ``CrossEncoderScorer``, or anything with
    ``predict(pairs)``), and combined with the fusion by the core's formula over those candidates:
    ``weight * z(cross-encoder) + (1 - weight) * z(fusion)`` (``weighted_fuse``, ``topk_zscore``). ``weight`` 1
    is the cross-encoder alone (its order), 0 the fusion alone. Returns ``{qid: {doc id: score}}`` over the same
    candidates."""
    from embtune.retrieval.fusion import ranked, weighted_fuse

    candidates = {qid: ranked(fused[qid], depth) for qid in fused}
    pairs = [(query_texts[int(qid)], doc_text[d]) for qid in fused for d in candidates[qid]]
    logger.info("label-free teacher: %d (pseudo-query, candidate) pairs rescored by %s", len(pairs),
                getattr(scorer, "name_or_path", type(scorer).__name__))
    scores = np.asarray(scorer.predict(pairs), dtype=np.float64).reshape(-1)  # (n_pairs,)
    cross: dict[str, dict[str, float]] = {}
    offset = 0
    for qid in fused:
        cross[qid] = {d: float(s) for d, s in zip(candidates[qid], scores[offset:offset + len(candidates[qid])])}
        offset += len(candidates[qid])
    restricted = {qid: {d: fused[qid][d] for d in candidates[qid]} for qid in fused}
    return weighted_fuse(cross, restricted, weight, depth, normalization="topk_zscore")
