"""Cross-encoder reranking: one copy for eval, the RAG check, the teacher and serve.

- ``CrossEncoderScorer``: a ``sentence_transformers.CrossEncoder`` whose (query, document) logits are cached on disk
  by model and pair (``$EMBTUNE_CACHE/teacher_scores/<model key>_<max_length>.jsonl``); raw logits, no sigmoid, so
  a teacher's margins are not squashed. ``model_calls`` counts the pairs actually sent to the model.
- ``rerank``: rescore each query's top ``top_k`` of a run with any scorer that has ``predict(pairs)``.

Example::

    scorer = CrossEncoderScorer("runs/teacher/cross_encoder/model", batch_size=32)
    scores = scorer.score([("what is BM25?", "BM25 is a ranking function ..."), ...])  # (n_pairs,) float64
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from embtune.retrieval.fusion import Run, ranked

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


class CrossEncoderScorer:
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

        self.name_or_path = resolve_model(name_or_path, must_exist=True)
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

    def predict(self, pairs: Sequence[tuple[str, str]], batch_size: int | None = None, **_: object) -> np.ndarray:
        """``CrossEncoder.predict``'s signature, for :func:`rerank` (the batch size is the scorer's own)."""
        return self.score(pairs)


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
