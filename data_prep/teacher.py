"""Teachers that score (query, document) pairs for distillation.

A cross-encoder teacher is ``embtune.retrieval.rerank.CrossEncoderScorer`` (scores cached on disk); the label-free
teacher is :class:`HybridTeacher` below.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)


HYBRID_TEACHER = "hybrid"


class HybridTeacher:
    """A label-free teacher: ``cosine(dense model) + bm25_weight * BM25 / the query's best BM25 score``.

    For a corpus without labelled queries there is no cross-encoder to distil from, but two retrievers that fail in
    different ways are at hand: the base dense model and BM25. On SciFact their fusion beats either alone, so its
    scores are pseudo-labels that carry information the student lacks (GPL distils a cross-encoder the same way).
    The dense part is a cosine, on the student's scale, so ``train.margin_mse_scale: 1`` fits. BM25 is divided by
    the query's top score over the whole corpus, so the lexical part lies in [0, 1] whatever the query's length.

    Selected with ``mining.teacher: hybrid`` (``mining.teacher_bm25_weight`` sets the weight). Scores are computed,
    not cached: BM25 over the corpus and the corpus embeddings (cached by ``embtune.retrieval.encoder.encode``) are
    cheap.

    Args:
        doc_texts: every corpus document (BM25 statistics are over the whole corpus); pairs must use these texts.
        model_name: the dense model (a folder, hub name or ``embtune.models`` alias).
        tokenizer: the BM25 tokenizer (``data_prep.run.bm25_tokenizer``).
        bm25_weight: weight of the normalized BM25 score; 0 = the dense model alone.
    """

    def __init__(self, doc_texts: Sequence[str], model_name: str, tokenizer, bm25_weight: float = 1.0,
                 batch_size: int = 64, max_seq_length: int = 0) -> None:
        from embtune.retrieval.bm25 import FastBM25

        self.name_or_path = f"{HYBRID_TEACHER}({model_name} + {bm25_weight} x bm25)"
        self.doc_texts = list(doc_texts)
        self.row_of = {text: row for row, text in enumerate(self.doc_texts)}
        self.tokenizer = tokenizer
        self.index = FastBM25(tokenizer.tokenize_many(self.doc_texts))
        self.bm25_weight = bm25_weight
        self.model_name = model_name
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self.model_calls = 0
        self._doc_emb = None
        self._model = None

    def _encoder(self):
        if self._model is None:
            from embtune.retrieval.encoder import encode, load_encoder

            self._model, key = load_encoder(self.model_name, self.max_seq_length)
            self._doc_emb = encode(self._model, self.doc_texts, self.batch_size, cache_key=key,
                                   desc="teacher corpus")  # (n_docs, dim), from the shared embedding cache
        return self._model

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """(n_pairs,) float64 scores; every document must be one of ``doc_texts``."""
        missing = next((d for _, d in pairs if d not in self.row_of), None)
        if missing is not None:
            raise ValueError(f"the hybrid teacher scores corpus documents only; not in the corpus: {missing[:80]!r}")
        if not pairs:
            return np.zeros(0)
        model = self._encoder()
        queries = list(dict.fromkeys(q for q, _ in pairs))
        query_row = {q: i for i, q in enumerate(queries)}
        from embtune.retrieval.encoder import encode

        query_emb = encode(model, queries, self.batch_size, desc="teacher query")  # (n_queries, dim)
        bm25 = {}
        for query in queries:
            scores = self.index.get_scores(self.tokenizer(query))  # (n_docs,)
            top = float(scores.max()) if len(scores) else 0.0
            bm25[query] = scores / top if top > 0 else np.zeros_like(scores)
        rows = np.array([self.row_of[d] for _, d in pairs])
        cosine = np.einsum("ij,ij->i", self._doc_emb[rows], query_emb[[query_row[q] for q, _ in pairs]])
        lexical = np.array([bm25[q][row] for (q, _), row in zip(pairs, rows)])
        self.model_calls += len(pairs)
        return cosine.astype(np.float64) + self.bm25_weight * lexical
