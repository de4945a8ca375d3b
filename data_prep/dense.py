"""Dense candidates for mining: encode with a sentence-transformer, search a FAISS index.

Document embeddings are cached on disk by ``eval.retrieval.encode`` (key: model content hash or hub name, max
sequence length, and the hash of the texts), so mining and evaluating the same base model encode the corpus once.
``flat`` is exact inner product; ``ivf`` (``IndexIVFFlat``, inner product) is for corpora where exact search is too
slow: ``nlist`` coarse clusters trained on the documents, ``nprobe`` of them searched per query. Exact search is
the ground truth for IVF (see tests/test_mining_methods.py).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import faiss
import numpy as np

logger = logging.getLogger(__name__)


def load_encoder(model_name: str, max_seq_length: int = 0):
    """(SentenceTransformer, embedding cache key). The key is eval/run.py's (model content hash or hub name, then
    max sequence length), so mining, the hybrid teacher and the evaluation of one model encode the corpus once."""
    from sentence_transformers import SentenceTransformer

    from embtune.manifest import hash_path
    from embtune.models import resolve_model

    path = resolve_model(model_name)
    model = SentenceTransformer(path, device=None)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    key = hash_path(path) if Path(path).exists() else path.replace("/", "__")
    return model, f"{key}_{model.max_seq_length}"


def encode_for_mining(model_name: str, doc_texts: list[str], query_texts: list[str], batch_size: int = 64,
                      max_seq_length: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(doc embeddings (n_docs, dim), query embeddings (n_queries, dim)), float32, normalized for cosine models."""
    from eval.retrieval import encode

    model, key = load_encoder(model_name, max_seq_length)
    if getattr(model, "similarity_fn_name", "cosine") not in (None, "cosine"):
        logger.warning("mining model %s scores by %s; guard scores are its raw similarities, not cosine",
                       model_name, model.similarity_fn_name)
    doc_emb = encode(model, doc_texts, batch_size, cache_key=key, desc="mining corpus")  # (n_docs, dim)
    query_emb = encode(model, query_texts, batch_size, cache_key=key, desc="mining query")  # (n_queries, dim)
    return doc_emb, query_emb


def search(doc_emb: np.ndarray, query_emb: np.ndarray, k: int, index: str = "flat", nlist: int = 0,
           nprobe: int = 16, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents by inner product; returns (indices, scores), each (n_queries, k), best first.

    With ``ivf``, fewer than ``k`` documents can come back for a query (FAISS pads with index -1); callers skip
    negative indices.
    """
    doc_emb = np.ascontiguousarray(doc_emb, dtype=np.float32)
    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
    n_docs, dim = doc_emb.shape
    k = min(k, n_docs)
    if index == "flat":
        faiss_index = faiss.IndexFlatIP(dim)
    elif index == "ivf":
        nlist = nlist or max(1, int(4 * math.sqrt(n_docs)))
        nlist = min(nlist, n_docs)
        quantizer = faiss.IndexFlatIP(dim)
        faiss_index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        faiss_index.cp.seed = seed
        faiss_index.train(doc_emb)
        faiss_index.nprobe = min(nprobe, nlist)
        logger.info("IVF index: %d lists, nprobe %d", nlist, faiss_index.nprobe)
    else:
        raise ValueError(f"mining.faiss_index must be 'flat' or 'ivf', got {index!r}")
    faiss_index.add(doc_emb)
    scores, indices = faiss_index.search(query_emb, k)
    return indices.astype(np.int64), scores.astype(np.float64)
