"""FAISS search with one return convention: ``(scores, indices)``, each (n_queries, k), best first, as FAISS does.

``flat`` is exact inner product (cosine on normalized embeddings) and the ground truth for the approximate ones;
``ivf`` (``IndexIVFFlat``) searches ``nprobe`` of ``nlist`` coarse clusters. An approximate index can return fewer
than ``k`` documents for a query: FAISS pads with index -1, and :func:`to_run` skips those.

Without faiss installed (a slim environment, e.g. a GPU box with only the training stack), ``flat`` falls back to
an exact numpy search with the same ordering, and says so once; the other index types need faiss.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np

try:
    import faiss
except ImportError:  # pragma: no cover - faiss-cpu is a dependency; see the module docstring
    faiss = None

logger = logging.getLogger(__name__)

Run = dict[str, dict[str, float]]


def search(doc_emb: np.ndarray, query_emb: np.ndarray, k: int, index: str = "flat", nlist: int = 0,
           nprobe: int = 16, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` documents by inner product: (scores float32, indices int64), each (n_queries, min(k, n_docs))."""
    doc_emb = np.ascontiguousarray(doc_emb, dtype=np.float32)
    query_emb = np.ascontiguousarray(query_emb, dtype=np.float32)
    n_docs, dim = doc_emb.shape
    k = min(k, n_docs)
    if faiss is None and index == "flat":
        return numpy_exact(doc_emb, query_emb, k)
    if faiss is None:
        raise ImportError(f"index {index!r} needs faiss: pip install faiss-cpu")
    if index == "flat":
        faiss_index = faiss.IndexFlatIP(dim)
    elif index == "ivf":
        nlist = min(nlist or max(1, int(4 * math.sqrt(n_docs))), n_docs)
        faiss_index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        faiss_index.cp.seed = seed
        faiss_index.train(doc_emb)
        faiss_index.nprobe = min(nprobe, nlist)
        logger.info("IVF index: %d lists, nprobe %d", nlist, faiss_index.nprobe)
    else:
        raise ValueError(f"index must be 'flat' or 'ivf', got {index!r}")
    faiss_index.add(doc_emb)
    scores, indices = faiss_index.search(query_emb, k)
    return scores, indices.astype(np.int64)


@functools.cache
def _say_no_faiss() -> None:
    # Once per process: the server searches one query at a time.
    logger.warning("faiss is not installed: exact search with numpy")


def numpy_exact(doc_emb: np.ndarray, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product, best first (ties by lower index, as IndexFlatIP returns them)."""
    _say_no_faiss()
    scores = query_emb @ doc_emb.T  # (n_queries, n_docs)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (n_queries, k)
    return np.take_along_axis(scores, order, axis=1), order.astype(np.int64)


def exact_search(doc_emb: np.ndarray, query_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (``faiss.IndexFlatIP``): (scores, indices)."""
    return search(doc_emb, query_emb, k, index="flat")


def to_run(query_ids: list[str], doc_ids: list[str], scores: np.ndarray, indices: np.ndarray) -> Run:
    """pytrec_eval run format, ``{query id: {doc id: score}}``, from (scores, indices); index -1 is skipped."""
    return {
        qid: {doc_ids[j]: float(s) for s, j in zip(scores[i], indices[i]) if j >= 0}
        for i, qid in enumerate(query_ids)
    }
