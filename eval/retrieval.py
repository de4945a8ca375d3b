"""Dense retrieval for evaluation: encode, then search a FAISS exact inner-product index."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import faiss
import numpy as np

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("EMBTUNE_CACHE", Path.home() / ".cache" / "embtune")) / "embeddings"


def normalize(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)


def truncate(embeddings: np.ndarray, dim: int, renormalize: bool = True) -> np.ndarray:
    """Matryoshka truncation to the first ``dim`` coordinates, renormalized for cosine similarity."""
    out = np.ascontiguousarray(embeddings[:, :dim], dtype=np.float32)  # (n, dim)
    return normalize(out) if renormalize else out


def uses_cosine(model) -> bool:
    return getattr(model, "similarity_fn_name", "cosine") in (None, "cosine")


def encode(model, texts: list[str], batch_size: int = 64, cache_key: str | None = None, desc: str = "") -> np.ndarray:
    """Encode texts to float32 (n, dim), normalized when the model scores by cosine.

    With ``cache_key`` (identifying the model weights), embeddings are cached on disk by model and text hash.
    """
    path = None
    if cache_key:
        text_hash = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
        path = cache_dir() / f"{cache_key}_{text_hash}.npy"
        if path.is_file():
            logger.info("embeddings cache hit: %s", path)
            return np.load(path)
    logger.info("encoding %d %s texts", len(texts), desc)
    embeddings = model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                              show_progress_bar=len(texts) > 1000, normalize_embeddings=False)
    embeddings = embeddings.astype(np.float32)
    if uses_cosine(model):
        embeddings = normalize(embeddings)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, embeddings)
        os.replace(tmp, path)
    return embeddings


def exact_search(doc_emb: np.ndarray, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product with ``faiss.IndexFlatIP`` (exact); returns (scores, indices), each (n_queries, k)."""
    index = faiss.IndexFlatIP(doc_emb.shape[1])
    index.add(np.ascontiguousarray(doc_emb, dtype=np.float32))
    return index.search(np.ascontiguousarray(query_emb, dtype=np.float32), min(k, doc_emb.shape[0]))


def to_run(query_ids: list[str], doc_ids: list[str], scores: np.ndarray, indices: np.ndarray) -> dict[str, dict[str, float]]:
    """pytrec_eval run format: {query id: {doc id: score}}."""
    return {
        qid: {doc_ids[j]: float(s) for s, j in zip(scores[i], indices[i]) if j >= 0}
        for i, qid in enumerate(query_ids)
    }


def bm25_run(doc_ids: list[str], doc_texts: list[str], query_ids: list[str], query_texts: list[str],
             k: int = 1000, backend: str = "fast", tokenizer=None) -> dict[str, dict[str, float]]:
    """BM25 baseline (BM25Okapi): ``fast`` = data_prep.fast_bm25 (exact rank-bm25 scores), ``rank_bm25`` = the
    reference. ``tokenizer`` is a ``BM25Tokenizer`` (default: lowercase ``\\w+`` word tokens)."""
    from data_prep.mining import bm25_ranking

    ranking = bm25_ranking(doc_texts, query_texts, k, backend=backend, tokenizer=tokenizer)
    return to_run(query_ids, doc_ids, ranking.scores, ranking.indices)
