"""Cross-encoder teacher scores with an on-disk cache, and reranking with the teacher.

A teacher is any ``sentence_transformers.CrossEncoder`` (a local folder, e.g. one trained by
``python -m train.cross_encoder``, or a hub name). Scores are raw logits (no sigmoid), so margins between a
positive and a negative are not squashed. Every scored (query, document) pair is appended to a JSONL cache under
``$EMBTUNE_CACHE/teacher_scores/<model key>_<max_length>.jsonl``; a second run over the same pairs makes no model
calls (``TeacherScorer.model_calls`` counts the pairs actually sent to the model).

Example::

    scorer = TeacherScorer("runs/teacher/cross_encoder/model", batch_size=32)
    scores = scorer.score([("what is BM25?", "BM25 is a ranking function ..."), ...])  # (n_pairs,) float64
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)


def teacher_cache_dir() -> Path:
    return Path(os.environ.get("EMBTUNE_CACHE", Path.home() / ".cache" / "embtune")) / "teacher_scores"


def model_key(name_or_path: str) -> str:
    """A local folder is identified by its content hash (retraining changes it); a hub name by its name."""
    from embtune.manifest import hash_path

    if Path(name_or_path).exists():
        return "local-" + hash_path(name_or_path)
    return name_or_path.replace("/", "__")


def pair_key(query: str, document: str) -> str:
    return hashlib.sha1(f"{query}\x00{document}".encode()).hexdigest()


class TeacherScorer:
    """Cross-encoder logits for (query, document) pairs, cached on disk by model and pair.

    Args:
        name_or_path: a CrossEncoder folder or hub name (``embtune.models.resolve_model`` aliases work).
        batch_size: pairs per forward pass.
        max_length: truncation length of the concatenated pair, in tokens.
        device: ``None`` picks CUDA when available.
    """

    def __init__(self, name_or_path: str, batch_size: int = 32, max_length: int = 512,
                 device: str | None = None) -> None:
        from embtune.models import resolve_model

        self.name_or_path = resolve_model(name_or_path)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device
        self.model_calls = 0  # pairs sent to the model (cache misses)
        self.cache_path = teacher_cache_dir() / f"{model_key(self.name_or_path)}_{max_length}.jsonl"
        self._cache: dict[str, float] = {}
        self._model = None
        if self.cache_path.is_file():
            with open(self.cache_path) as handle:
                for line in handle:
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by an interrupted run
                        continue
                    self._cache[entry["k"]] = entry["s"]
            logger.info("teacher cache: %d scores from %s", len(self._cache), self.cache_path)

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import CrossEncoder

            self._model = CrossEncoder(self.name_or_path, max_length=self.max_length, device=self.device)
            if self._model.num_labels != 1:
                raise ValueError(f"mining.teacher {self.name_or_path!r} has {self._model.num_labels} labels; a "
                                 "teacher must output one relevance logit (CrossEncoder(..., num_labels=1))")
        return self._model

    def score(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """(n_pairs,) float64 teacher logits; cached pairs are not recomputed, new ones are appended to the cache."""
        import torch

        keys = [pair_key(q, d) for q, d in pairs]
        missing: dict[str, tuple[str, str]] = {}
        for key, pair in zip(keys, pairs):
            if key not in self._cache and key not in missing:
                missing[key] = pair
        if missing:
            todo = list(missing.items())
            logger.info("teacher: scoring %d new pairs (%d cached)", len(todo), len(pairs) - len(todo))
            logits = self.model.predict([pair for _, pair in todo], batch_size=self.batch_size,
                                        activation_fn=torch.nn.Identity(), convert_to_numpy=True,
                                        show_progress_bar=len(todo) > 2000)
            self.model_calls += len(todo)
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path, "a") as handle:
                for (key, _), value in zip(todo, np.asarray(logits, dtype=np.float64).reshape(-1)):
                    self._cache[key] = float(value)
                    handle.write(json.dumps({"k": key, "s": float(value)}) + "\n")
        return np.array([self._cache[key] for key in keys], dtype=np.float64)


def rerank(scorer: TeacherScorer, run: dict[str, dict[str, float]], query_texts: dict[str, str],
           doc_texts: dict[str, str], depth: int) -> dict[str, dict[str, float]]:
    """Rerank each query's top-``depth`` documents of ``run`` by teacher score (pytrec_eval run format).

    Documents below ``depth`` are dropped, so metrics at cutoffs <= ``depth`` are the reranker's own.
    """
    tops = {q: sorted(docs, key=lambda d: -docs[d])[:depth] for q, docs in run.items()}
    pairs = [(query_texts[q], doc_texts[d]) for q, docs in tops.items() for d in docs]
    scores = iter(scorer.score(pairs))
    return {q: {d: float(next(scores)) for d in docs} for q, docs in tops.items()}


HYBRID_TEACHER = "hybrid"


class HybridTeacher:
    """A label-free teacher: ``cosine(dense model) + bm25_weight * BM25 / the query's best BM25 score``.

    For a corpus without labelled queries there is no cross-encoder to distil from, but two retrievers that fail in
    different ways are at hand: the base dense model and BM25. On SciFact their fusion beats either alone, so its
    scores are pseudo-labels that carry information the student lacks (GPL distils a cross-encoder the same way).
    The dense part is a cosine, on the student's scale, so ``train.margin_mse_scale: 1`` fits. BM25 is divided by
    the query's top score over the whole corpus, so the lexical part lies in [0, 1] whatever the query's length.

    Selected with ``mining.teacher: hybrid`` (``mining.teacher_bm25_weight`` sets the weight). Scores are computed,
    not cached: BM25 over the corpus and the corpus embeddings (cached by ``eval.retrieval.encode``) are cheap.

    Args:
        doc_texts: every corpus document (BM25 statistics are over the whole corpus); pairs must use these texts.
        model_name: the dense model (a folder, hub name or ``embtune.models`` alias).
        tokenizer: the BM25 tokenizer (``data_prep.run.bm25_tokenizer``).
        bm25_weight: weight of the normalized BM25 score; 0 = the dense model alone.
    """

    def __init__(self, doc_texts: Sequence[str], model_name: str, tokenizer, bm25_weight: float = 1.0,
                 batch_size: int = 64, max_seq_length: int = 0) -> None:
        from data_prep.fast_bm25 import FastBM25

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
            from data_prep.dense import load_encoder
            from eval.retrieval import encode

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
        from eval.retrieval import encode

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
